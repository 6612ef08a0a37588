"""The chaos suite: one seeded randomized run with every fault kind.

``ARES_CHAOS_JOBS`` and ``ARES_CHAOS_SEED`` scale it up or replay a seed
(the seed is printed with the report on failure and success alike).
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.driver import FAULTS, ChaosConfig, run_chaos

pytestmark = [pytest.mark.fault, pytest.mark.chaos, pytest.mark.timeout(600)]


def test_randomized_faults_every_request_commits_exactly_once(capsys):
    seed = os.environ.get("ARES_CHAOS_SEED")
    config = ChaosConfig(jobs=int(os.environ.get("ARES_CHAOS_JOBS", "200")),
                         seed=int(seed) if seed else None)
    report = run_chaos(config)
    with capsys.disabled():
        print("\n" + report.table())
    assert report.ok, report.table()
    assert {f.name for f in report.faults} == set(FAULTS)
    assert report.committed == config.jobs
    assert report.submissions >= 2 * config.jobs
    # The paused careless body woke up and tried to commit as a zombie.
    assert report.zombies_rejected >= 1
