"""The README's usage snippet runs as written: saved as ``shop.py``, a real
``celery -A shop worker`` imports it (no client code runs at import) and
``python shop.py`` prints the job's result. Only the service addresses
are swapped for this test session's private servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from celery import Celery

from tests.processes import ROOT, wait_for

pytestmark = pytest.mark.integration


def snippet() -> str:
    text = (ROOT / "README.md").read_text()
    usage = text.split("## Use it", 1)[1]
    match = re.search(r"```python\n(# shop\.py\n.*?)```", usage, re.S)
    assert match, "the README's usage snippet (# shop.py) is missing"
    return match.group(1)


def test_readme_snippet_runs_as_written(services, tmp_path):
    redis_server, etcd_server = services
    source = snippet()
    assert "redis://127.0.0.1:6379/0" in source and "127.0.0.1:2379" in source
    source = source.replace("redis://127.0.0.1:6379/0",
                            f"{redis_server.url}/0")
    source = source.replace("127.0.0.1:2379", etcd_server.endpoint)
    (tmp_path / "shop.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "shop", "worker", "-n",
         "readme@test", "-c", "1", "--without-mingle", "--without-gossip"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    probe = Celery(broker=f"{redis_server.url}/0")
    try:
        def ready():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            return probe.control.ping(["readme@test"], timeout=0.5)
        wait_for(ready, 60, "the README worker to answer a ping")
        client = subprocess.run([sys.executable, "shop.py"], cwd=tmp_path,
                                env=env, capture_output=True, text=True,
                                timeout=60)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "ok"
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
