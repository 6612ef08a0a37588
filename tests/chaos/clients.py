"""A chaos client process: submits its share of requests, retrying (same
request id) on any service trouble, as a real client would."""

from __future__ import annotations

import faulthandler
import json
import os
import random
import signal
import time
from pathlib import Path


def client_main(env: dict, items: list, pause: float, seed: int,
                 out: str) -> None:
    """Submit each ``(request id, task, args)`` item, then write what came
    back to ``out`` for the audit."""
    os.environ.update(env)
    # The driver sends SIGUSR1 to a client that has not finished in time:
    # its threads' stacks go to the driver's stderr (the chaos test's output).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from ares_celery.errors import AresError, RequestIdConflict
    from tests.chaos import app as chaos

    rng = random.Random(seed)
    tasks = {"pay": chaos.pay, "train": chaos.train}
    seen, retries = {}, 0
    for request_id, kind, args in items:
        delay = 0.05
        while True:
            try:
                result = tasks[kind].apply_async(args, request_id=request_id)
                seen[request_id] = result.id
                break
            except RequestIdConflict:
                raise
            except (AresError, OSError, Exception):  # noqa: BLE001
                retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        time.sleep(rng.uniform(0, pause))
    Path(out).write_text(json.dumps({"ids": seen, "retries": retries,
                                     "submitted": len(items)}))
