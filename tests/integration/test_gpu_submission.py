"""Bad GPU requests fail at decoration or submission, with clear errors,
and publish nothing."""

from __future__ import annotations

import pytest

from ares_celery import AresError
from ares_celery.errors import GpuRequestError, NoGpuHosts, UnsatisfiableGpuRequest
from ares_celery.gpu import mock_topology
from ares_celery.gpu.inventory import InventoryPublisher, host_queue
from ares_celery.keys import Keys
from tests.records import KEYS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kwargs, fragment", [
    ({"gpus": 0}, "gpus must be an int >= 1"),
    ({"gpus": -2}, "gpus must be an int >= 1"),
    ({"gpus": 2.5}, "gpus must be an int >= 1"),
    ({"gpus": True}, "gpus must be an int >= 1"),
    ({"gpus": "4"}, "gpus must be an int >= 1"),
    ({"gpus": 1, "min_memory_gb": 0}, "min_memory_gb must be a number > 0"),
    ({"gpus": 1, "min_memory_gb": -40}, "min_memory_gb must be a number > 0"),
    ({"gpus": 1, "min_memory_gb": "40"}, "min_memory_gb must be a number > 0"),
    ({"gpus": 1, "interconnect": "infiniband"}, "interconnect must be one of"),
])
def test_decorator_validates_the_request(jobs, kwargs, fragment):
    with pytest.raises(GpuRequestError, match=fragment) as info:
        jobs.ares.gpu_task(**kwargs)(lambda: None)
    assert isinstance(info.value, AresError)


def publish(etcd, host, mock):
    pub = InventoryPublisher(etcd, Keys("ares"), mock_topology(mock, host=host),
                             lease_ttl=10, queue=host_queue(host))
    pub.publish()
    return pub


def test_no_registered_hosts(jobs, store, broker):
    with pytest.raises(NoGpuHosts, match="no GPU hosts are registered"):
        jobs.gpu2.apply_async(request_id="nowhere")
    assert broker.queue_length("celery") == 0
    assert store.keys(KEYS.dedup("*")) == []


@pytest.mark.parametrize("task, fragment", [
    ("gpu8", "has 4 GPUs; need 8"),
    ("gpu2_nvlink", "NVLink"),
])
def test_impossible_request_names_the_closest_host(jobs, etcd, store, task,
                                                   fragment, broker):
    pub = publish(etcd, "small", "pcie-4x-2switch")
    try:
        jobs.ares.router.cache().wait_for(lambda h: "small" in h, 5)
        with pytest.raises(UnsatisfiableGpuRequest) as info:
            getattr(jobs, task).apply_async(request_id=f"impossible-{task}")
        message = str(info.value)
        assert "closest is small" in message and fragment in message
        assert broker.queue_length("ares.gpu.small") == 0
        assert store.keys(KEYS.dedup("*")) == []
    finally:
        pub.withdraw()


def test_too_little_memory_everywhere(jobs, etcd):
    pub = publish(etcd, "a100", "dgx-a100")

    def big_memory():
        return None

    big = jobs.ares.gpu_task(name="jobs.big_memory", gpus=1,
                             min_memory_gb=200)(big_memory)
    try:
        jobs.ares.router.cache().wait_for(lambda h: "a100" in h, 5)
        with pytest.raises(UnsatisfiableGpuRequest, match="200 GB"):
            big.apply_async(request_id="too-big")
    finally:
        pub.withdraw()


def test_route_goes_to_the_best_host_queue(jobs, etcd, store, broker):
    pubs = [publish(etcd, "v100", "dgx1-v100"), publish(etcd, "h100", "hgx-h100")]
    try:
        jobs.ares.router.cache().wait_for(lambda h: {"v100", "h100"} <= set(h), 5)
        result = jobs.gpu4_nvlink.apply_async(request_id="route-me")
        assert broker.queue_length("ares.gpu.h100") == 1     # NV18 beats NV1/NV2
        assert broker.queue_length("ares.gpu.v100") == 0
        again = jobs.gpu4_nvlink.apply_async(request_id="route-me")
        assert again.id == result.id and broker.queue_length("ares.gpu.h100") == 1
    finally:
        for pub in pubs:
            pub.withdraw()
