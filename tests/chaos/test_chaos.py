"""The chaos suite: one seeded randomized run with every fault kind.

The driver runs in its own process (it starts servers, workers and clients
and sets their environment; none of that may leak into other tests).
``ARES_CHAOS_JOBS`` and ``ARES_CHAOS_SEED`` scale it up or replay a seed;
the seed is printed with the report on success and failure alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.chaos.driver import FAULTS
from tests.processes import ROOT

pytestmark = [pytest.mark.fault, pytest.mark.chaos, pytest.mark.timeout(900)]


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_randomized_faults_every_request_commits_exactly_once(
        tmp_path, capsys, broker):
    jobs = int(os.environ.get("ARES_CHAOS_JOBS", "200"))
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "tests.chaos.driver", "--jobs", str(jobs),
           "--broker", broker, "--report-json", str(out)]
    if os.environ.get("ARES_CHAOS_SEED"):
        cmd += ["--seed", os.environ["ARES_CHAOS_SEED"]]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=840)
    except subprocess.TimeoutExpired as exc:
        # The driver dumped its stacks at 720 s (--dump-stacks-after):
        # show them and the progress lines instead of only the timeout.
        pytest.fail("chaos driver hung:\n" + _text(exc.stdout)[-6000:] +
                    "\n" + _text(exc.stderr)[-12000:], pytrace=False)
    with capsys.disabled():
        print("\n" + proc.stdout[-6000:])
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"], report["table"]
    assert proc.returncode == 0
    assert set(report["faults"]) == set(FAULTS)
    assert report["committed"] == jobs
    assert report["submissions"] >= 2 * jobs
    # The paused careless body woke up and tried to commit as a zombie.
    assert report["zombies_rejected"] >= 1, report["table"]
