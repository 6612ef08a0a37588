"""The NVML probe on a real GPU host, checked against ``nvidia-smi``.

Skipped where NVML does not start (CI, laptops): the other probe tests run
on recorded driver answers (``fake_pynvml``); this one is what says those
recordings still match a real driver. Run it on a GPU host with
``pytest tests/gpu/test_gpu_nvml_real.py``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ares_celery.errors import NvmlUnavailable
from ares_celery.gpu.model import parse_topo_matrix
from ares_celery.gpu.nvml_probe import probe_nvml


@pytest.fixture(scope="module")
def probed():
    try:
        return probe_nvml("real-host")
    except NvmlUnavailable as exc:
        pytest.skip(f"no NVML here: {exc}")


def smi(*args: str) -> str:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("NVML works but nvidia-smi is not on PATH")
    return subprocess.run(["nvidia-smi", *args], check=True,
                          capture_output=True, text=True).stdout


def test_every_gpu_nvidia_smi_lists_is_probed_as_it_reports_it(probed):
    rows = [line.split(", ") for line in smi(
        "--query-gpu=index,uuid,name,memory.total",
        "--format=csv,noheader,nounits").strip().splitlines()]
    assert len(probed) == len(rows) >= 1
    for gpu, (index, uuid, name, memory) in zip(probed.gpus, rows, strict=True):
        assert (gpu.index, gpu.uuid, gpu.name) == (int(index), uuid, name)
        assert gpu.memory_total_mb == int(memory)
        assert 0 <= gpu.memory_free_mb <= gpu.memory_total_mb
        assert gpu.pcie_gen and gpu.pcie_width


def test_links_agree_with_nvidia_smi_topo(probed):
    """NVLink or PCIe, and the lane count, for every pair (none on a
    one-GPU host: then only the matrix's shape is compared)."""
    matrix = parse_topo_matrix(smi("topo", "-m"), host="real-host")
    assert len(matrix) == len(probed)
    for (a, b), link in probed.links.items():
        seen = matrix.link(a, b)
        assert link.kind == seen.kind, (a, b, link, seen)
        if link.kind == "nvlink" and seen.nvlink_lanes is not None:
            assert link.nvlink_lanes == seen.nvlink_lanes, (a, b)
