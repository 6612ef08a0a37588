import warnings

import pytest
from celery import Celery

from ares_celery import Ares, AresError, AresWarning, ConfigurationError
from ares_celery.app import REDIS_BACKEND


def make(**conf):
    app = Celery("t", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(broker_transport_options={"visibility_timeout": 3600},
                    **conf)
    return app


def test_defaults_and_backend_installed():
    app = make()
    ares = Ares(app)
    s = ares.settings
    assert (s.lease_ttl, s.dedup_ttl, s.namespace) == (30, 86400, "ares")
    assert s.redis_url == "redis://127.0.0.1:1/0"
    assert app.conf.result_backend == f"{REDIS_BACKEND}+redis://127.0.0.1:1/0"
    assert type(app.backend).__name__ == "FencedRedisBackend"


@pytest.mark.parametrize("ttl", [0, 1, 3601, -5, 2.5, "30", True])
def test_lease_ttl_out_of_range(ttl):
    with pytest.raises(ConfigurationError, match="ares_lease_ttl"):
        Ares(make(ares_lease_ttl=ttl))


@pytest.mark.parametrize("conf", [
    {"task_serializer": "pickle"},
    {"result_serializer": "pickle"},
    {"accept_content": ["json", "pickle"]},
    {"result_accept_content": ["pickle"]},
])
def test_pickle_is_refused(conf):
    with pytest.raises(ConfigurationError, match="JSON"):
        Ares(make(**conf))


def test_non_fencing_result_backend_is_refused():
    with pytest.raises(ConfigurationError, match="cannot fence"):
        Ares(make(result_backend="rpc://"))


def test_bad_etcd_endpoint_is_named():
    with pytest.raises(ConfigurationError, match="nohost"):
        Ares(make(ares_etcd_endpoints=["nohost"]))


def test_visibility_timeout_not_above_lease_ttl_warns():
    app = make()
    app.conf.broker_transport_options = {"visibility_timeout": 10}
    with pytest.warns(AresWarning, match="visibility_timeout=10s"):
        Ares(app)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ares(make())


def test_task_options_that_break_the_guarantee():
    ares = Ares(make())
    with pytest.raises(ConfigurationError, match="acks_late"):
        ares.task(acks_late=False)(lambda: None)
    with pytest.raises(ConfigurationError, match="JSON"):
        ares.task(serializer="pickle")(lambda: None)


def test_decorator_forms_and_acks_late():
    ares = Ares(make())

    @ares.task
    def plain():
        return 1

    @ares.task(name="custom.name", max_retries=7)
    def named():
        return 2

    assert named.name == "custom.name" and named.max_retries == 7
    for task in (plain, named):
        assert task.acks_late and task.reject_on_worker_lost
    assert plain() == 1  # calling directly runs the body, no broker


def test_current_outside_task():
    with pytest.raises(AresError, match="outside"):
        Ares.current()
