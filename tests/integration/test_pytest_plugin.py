"""The ``ares_celery`` pytest plugin, as a user's project sees it.

Each test writes a small user project's test file and runs pytest on it in
a subprocess (``pytester``), so the plugin is found the way a user's pytest
finds it: through its ``pytest11`` entry point, with nothing imported or
registered by hand.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.integration


EAGER_PROJECT = '''
import os

import pytest
from celery import Celery

from ares_celery import Ares, RequestIdConflict
from ares_celery.testing import free_port

# Nothing listens on these ports: eager tests must not need the services.
app = Celery("shop", set_as_current=False,
             broker=f"redis://127.0.0.1:{free_port()}/0")
app.conf.ares_etcd_endpoints = [f"127.0.0.1:{free_port()}"]
ares = Ares(app)
charges = []


@ares.task(name="shop.charge")
def charge(order, amount):
    ctx = ares.current()
    charges.append(ctx.fencing_token)
    return {"order": order, "amount": amount, "request_id": ctx.request_id}


@ares.gpu_task(name="shop.train", gpus=2)
def train():
    return [ares.current().host, os.environ["CUDA_VISIBLE_DEVICES"]]


@pytest.fixture(autouse=True)
def eager(ares_eager):
    charges.clear()
    return ares_eager(app)


def test_charge_is_idempotent():
    a = charge.apply_async(("o-1", 10), request_id="charge-o-1")
    b = charge.apply_async(("o-1", 10), request_id="charge-o-1")
    assert a.get() == b.get() == {"order": "o-1", "amount": 10,
                                  "request_id": "charge-o-1"}
    assert len(charges) == 1
    with pytest.raises(RequestIdConflict):
        charge.apply_async(("o-1", 99), request_id="charge-o-1")


def test_memory_was_reset_between_tests():
    charge.apply_async(("o-1", 10), request_id="charge-o-1").get()
    assert len(charges) == 1


def test_gpu_task_runs_on_the_mock_host():
    host, visible = train.delay().get()
    assert host == "mock-dgx-a100" and len(visible.split(",")) == 2

'''


SETTINGS_PROJECT = '''
from celery import Celery

from ares_celery import Ares
from ares_celery.testing import free_port

app = Celery("settings", set_as_current=False,
             broker=f"redis://127.0.0.1:{free_port()}/0")
app.conf.ares_etcd_endpoints = [f"127.0.0.1:{free_port()}"]
ares = Ares(app)


def test_settings_are_restored_after_the_test(request):
    conf = app.conf
    conf.task_eager_propagates = False

    def check():
        assert conf.task_always_eager is False
        assert conf.task_eager_propagates is False
    # Finalizers run last in, first out: this one after ares_eager's.
    request.addfinalizer(check)
    assert request.getfixturevalue("ares_eager")(app) is ares
    assert conf.task_always_eager and conf.task_eager_propagates
'''


def test_ares_eager_needs_no_services(pytester):
    pytester.makepyfile(test_shop=EAGER_PROJECT,
                        test_settings=SETTINGS_PROJECT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           timeout=120)
    result.assert_outcomes(passed=4)


def test_plugin_fixtures_are_listed(pytester):
    """Loaded by entry point, documented in ``pytest --fixtures``."""
    result = pytester.runpytest_subprocess("--fixtures", timeout=120)
    for name in ("ares_eager", "ares_services"):
        result.stdout.fnmatch_lines([f"{name}*ares_celery/testing/*"])


SERVICES_PROJECT = '''
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from ares_celery import Ares, ConfigurationError

runs = []


@pytest.fixture(scope="module")
def shop(ares_services):
    app = Celery("shop", set_as_current=False)
    ares_services.configure(app)
    ares = Ares(app)

    @ares.task(name="shop.charge")
    def charge(order):
        ctx = ares.current()
        runs.append(ctx.job_id)
        return {"order": order, "token": ctx.fencing_token}

    with start_worker(app, pool="threads", concurrency=1,
                      perform_ping_check=False, shutdown_timeout=20):
        yield app, charge


def test_charge_runs_once_on_a_real_worker(shop, ares_services):
    app, charge = shop
    assert app.conf.ares_etcd_endpoints == [ares_services.etcd_endpoint]
    first = charge.apply_async(("o-7",), request_id="charge-o-7")
    second = charge.apply_async(("o-7",), request_id="charge-o-7")
    assert first.id == second.id
    value = first.get(timeout=30)
    assert value["order"] == "o-7" and value["token"] > 0
    assert second.get(timeout=5) == value
    assert runs == [first.id]


def test_configure_after_ares_is_refused(shop, ares_services):
    app, _ = shop
    with pytest.raises(ConfigurationError, match="before Ares"):
        ares_services.configure(app)


def test_flush_empties_the_stores(shop, ares_services):
    import redis

    client = redis.Redis.from_url(ares_services.redis_url)
    client.set("left-over", 1)
    ares_services.flush()
    assert client.dbsize() == 0
    client.close()
'''


def test_ares_services_runs_a_real_worker(pytester):
    pytester.makepyfile(test_shop_services=SERVICES_PROJECT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           timeout=240)
    result.assert_outcomes(passed=3)

