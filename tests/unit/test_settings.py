import re
import warnings
from pathlib import Path

import pytest
from celery import Celery

import ares_celery
import ares_celery.app
import ares_celery.errors
from ares_celery import Ares, AresError, AresWarning, ConfigurationError
from ares_celery.app import REDIS_BACKEND
from ares_celery.errors import UnknownSettingWarning
from ares_celery.settings import DEFAULTS


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


# -- every ares_* setting is type-checked ---------------------------------

#: A wrong value for every setting in DEFAULTS: the kind of slip a config
#: file or an environment loader makes (a string for a number, a truthy
#: string for a flag, a bare port, an int where a path goes).
WRONG = {
    "ares_redis_url": 6379,
    "ares_etcd_endpoints": 2379,
    "ares_etcd_timeout": "2.0",
    "ares_etcd_user": 5,
    "ares_etcd_password": ["secret"],
    "ares_etcd_ca_cert": 3,
    "ares_etcd_cert": 3,
    "ares_etcd_key": 3,
    "ares_etcd_transport": 2,
    "ares_lease_ttl": "30",
    "ares_dedup_ttl": "86400",
    "ares_dedup_claim_timeout": "5",
    "ares_republish_after": "600",
    "ares_max_attempts": 2.5,
    "ares_recovery": "false",
    "ares_namespace": ["ares"],
    "ares_result_store": 1,
    "ares_lease_retry_max_delay": "30",
    "ares_redis_max_connections": "16",
    "ares_gpu_wait_timeout": "60",
    "ares_preempt_grace": -1,
    "ares_gpu_state_dir": 42,
    "ares_cuda_visible_devices": 0,
    "ares_metrics_port": 99999,
}


def test_a_wrong_value_is_listed_for_every_setting():
    # A new setting without a check (and a case here) fails this test.
    assert set(WRONG) == set(DEFAULTS)


@pytest.mark.parametrize("name", sorted(WRONG))
def test_every_setting_refuses_a_wrong_type(name):
    with pytest.raises(ConfigurationError, match=name) as info:
        Ares(make(**{name: WRONG[name]}))
    if name != "ares_etcd_password":
        shown = repr(WRONG[name])
        assert shown in str(info.value) \
            or type(WRONG[name]).__name__ in str(info.value)
    else:
        assert "secret" not in str(info.value)


@pytest.mark.parametrize("value", ["30", "thirty", None, [30]])
def test_numbers_given_as_strings_say_what_is_wanted(value):
    with pytest.raises(ConfigurationError) as info:
        Ares(make(ares_dedup_ttl=value))
    message = str(info.value)
    assert message.startswith("ares_dedup_ttl must be a whole number from "
                              "1 to 31536000, got ")
    assert f"{value!r} (a {type(value).__name__})" in message


def test_gpu_state_dir_takes_a_path_or_none(tmp_path):
    assert Ares(make(ares_gpu_state_dir=tmp_path)).settings.gpu_state_dir \
        == str(tmp_path)
    assert Ares(make()).settings.gpu_state_dir is None
    with pytest.raises(ConfigurationError, match="directory path"):
        Ares(make(ares_gpu_state_dir=""))


@pytest.mark.parametrize("value", [2379, "127.0.0.1:99999", "127.0.0.1:0",
                                   "127.0.0.1:abc", ["127.0.0.1:2379", 2380]])
def test_bad_etcd_endpoints_are_configuration_errors(value):
    with pytest.raises(ConfigurationError) as info:
        Ares(make(ares_etcd_endpoints=value))
    message = str(info.value)
    assert f"ares_etcd_endpoints={value!r}" in message
    assert "'host:port', 'http://host:port' or 'https://host:port'" in message


# -- unknown ares_* names warn with the closest valid one -----------------


def _unknown(app):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Ares(app)
    return [str(w.message) for w in caught
            if issubclass(w.category, UnknownSettingWarning)]


def test_a_misspelled_setting_warns_with_the_closest_name():
    app = make(ares_lease_tll=5)
    with pytest.warns(UnknownSettingWarning) as caught:
        ares = Ares(app)
    assert [str(w.message) for w in caught] == [
        "unknown setting 'ares_lease_tll' in app.conf is ignored; did you "
        "mean 'ares_lease_ttl'?"]
    assert caught[0].filename == __file__   # points at the user's Ares(app)
    assert ares.settings.lease_ttl == 30     # the typo changed nothing


def test_unknown_settings_from_config_from_object_warn():
    class Config:
        broker_url = "redis://127.0.0.1:1/0"
        ares_dedup_tl = 60
        ares_redis_max_conns = 4
        ARES_LEASE_TTL = 5              # Celery settings are lower case

    app = Celery("t", set_as_current=False)
    app.config_from_object(Config)
    messages = sorted(_unknown(app))
    assert len(messages) == 3, messages
    assert "'ARES_LEASE_TTL' in app.conf is ignored; write it " \
           "'ares_lease_ttl'" in messages[0]
    assert "'ares_dedup_tl'" in messages[1] and "'ares_dedup_ttl'?" \
        in messages[1]
    assert "'ares_redis_max_connections'?" in messages[2]


def test_namespaced_config_is_read_and_checked_under_its_prefix():
    class Config:
        CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
        CELERY_ARES_LEASE_TTL = 7
        CELERY_ARES_LEASE_TLL = 9

    app = Celery("t", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    with pytest.warns(UnknownSettingWarning,
                      match="'CELERY_ARES_LEASE_TLL' .* did you mean "
                            "'ares_lease_ttl'"):
        ares = Ares(app)
    assert ares.settings.lease_ttl == 7


def test_worker_options_set_as_settings_say_where_they_go():
    messages = _unknown(make(ares_mock_gpus="dgx1-v100"))
    assert len(messages) == 1
    assert "--ares-mock-gpus" in messages[0] and "ARES_MOCK_GPUS" \
        in messages[0]


def test_known_settings_and_other_names_do_not_warn():
    app = make(ares_lease_ttl=10, ares_metrics_port=None,
               area_code=1, myapp_setting=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ares(app)


def test_warning_classes():
    assert issubclass(UnknownSettingWarning, AresWarning)
    assert ares_celery.AresWarning is ares_celery.app.AresWarning \
        is ares_celery.errors.AresWarning


_CONF_READ = re.compile(
    r"""conf(?:\.get\(\s*|\[\s*)["'](ares_\w+)["']|conf\.(ares_\w+)""")


def test_every_setting_read_anywhere_is_known():
    """A setting read outside settings.py but missing from DEFAULTS would
    be reported as unknown (and escape the type checks)."""
    package = Path(ares_celery.__file__).parent
    read = {name for path in package.rglob("*.py")
            for match in _CONF_READ.finditer(path.read_text())
            for name in match.groups() if name}
    assert read, "the pattern no longer finds any read"
    assert read <= set(DEFAULTS), read - set(DEFAULTS)
