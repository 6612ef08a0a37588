"""The placement benchmark still runs (tiny trace) and its policies agree on basics."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ares_celery.gpu import mock_topology

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "placement_benchmark.py"


def load():
    spec = importlib.util.spec_from_file_location("placement_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_benchmark_simulation_runs():
    bench = load()
    hosts = [mock_topology(name, host=f"h{i}") for i, name in enumerate(bench.CLUSTER)]
    trace = bench.make_trace(60, 1, sum(len(h) for h in hosts))
    for policy in bench.POLICIES.values():
        result = bench.simulate(policy, hosts, trace)
        assert len(result.waits) == len(trace)
        assert all(bw > 0 for bw in result.bandwidths)


def test_seed_rule_prefers_adjacent_nv1_over_nv2():
    bench = load()
    topo = mock_topology("dgx1-v100")
    assert bench.seed_points(topo, tuple(range(8)), 2)[1] == (0, 1)
    assert bench.ours(topo, tuple(range(8)), 2)[1] == (0, 3)
    assert bench.exhaustive(topo, tuple(range(8)), 2)[0] == 50.0
