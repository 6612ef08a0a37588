"""A real ``celery flower`` subprocess for the observability tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ares_celery.flower import CONFIG_FILE
from ares_celery.testing.servers import die_with_parent, free_port, wait_until
from tests.processes import ROOT


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class FlowerProcess:
    """``celery -A <app> flower`` on a free loopback port with our
    ``--conf``; the REST API is opened without auth for this process only."""

    def __init__(self, app_module: str = "tests.apps.jobs") -> None:
        self.app_module = app_module
        self.port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="ares-flower-",
                                         suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> FlowerProcess:
        cmd = [sys.executable, "-m", "celery", "-A", self.app_module,
               "flower", f"--port={self.port}", "--address=127.0.0.1",
               f"--conf={CONFIG_FILE}"]
        env = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)
        wait_until(lambda: self.get("/healthcheck") == "OK", timeout,
                   "flower to answer", proc=self.proc, log=self.log)
        return self

    def wait_for_worker_events(self, worker: str, timeout: float = 20.0):
        """Until Flower has had events from ``worker`` (its heartbeats):
        before that its event queue may not exist yet, and events sent
        then are lost to it."""
        wait_until(lambda: worker in {
            w.get("hostname") for w in self.get_json(
                "/workers", json=1)["data"]}, timeout,
            f"flower to receive events from {worker}", proc=self.proc,
            log=self.log)

    def get(self, path: str, **params: Any) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return http_get(f"{self.url}{path}{query}")

    def get_json(self, path: str, **params: Any) -> Any:
        return json.loads(self.get(path, **params))

    def task_rows(self) -> dict[str, dict]:
        """Tasks as the Tasks page gets them (through ``format_task``)."""
        page = self.get_json("/tasks/datatable", draw=1, start=0, length=500,
                             **{"search[value]": "",
                                "order[0][column]": 0, "order[0][dir]": "asc",
                                "columns[0][data]": "received"})
        return {row["uuid"]: row for row in page["data"]}

    def wait_for_task_field(self, task_id: str, field: str,
                            timeout: float = 20.0) -> dict:
        """The task's row once Flower has recorded ``field`` for it."""
        return wait_until(lambda: (self.task_rows().get(task_id) or {})
                          .get(field) is not None and self.task_rows()[task_id],
                          timeout, f"flower to record {field} of {task_id}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
