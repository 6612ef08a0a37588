"""The TLS and auth settings: what is accepted, and every contradiction
refused with a message that names the setting."""

from __future__ import annotations

import pytest

from ares_celery.errors import ConfigurationError
from ares_celery.settings import AresSettings

BROKER = "redis://127.0.0.1:6399/0"


def settings(**conf) -> AresSettings:
    return AresSettings.from_conf({"broker_url": BROKER, **conf})


@pytest.fixture()
def pem(tmp_path):
    """Three readable files standing in for CA, certificate and key."""
    paths = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN-----\n")
        paths[name] = str(path)
    return paths


def test_defaults_are_plain_http_without_auth():
    sec = settings().etcd_security
    assert (sec.protocol, sec.user, sec.ca_cert) == ("http", None, None)


def test_https_endpoint_or_certificates_turn_tls_on(pem):
    assert settings(ares_etcd_endpoints=["https://e1:2379"]) \
        .etcd_security.protocol == "https"
    sec = settings(ares_etcd_endpoints=["e1:2379", "e2:2379"],
                   ares_etcd_ca_cert=pem["ca"], ares_etcd_cert=pem["cert"],
                   ares_etcd_key=pem["key"]).etcd_security
    assert (sec.protocol, sec.ca_cert, sec.cert, sec.key) == (
        "https", pem["ca"], pem["cert"], pem["key"])


def test_user_and_password_are_kept_and_the_password_not_shown():
    s = settings(ares_etcd_user="ares", ares_etcd_password="pw-123",
                 broker_url="redis://u:redis-pw@h:6379/0")
    assert (s.etcd_security.user, s.etcd_security.password) == (
        "ares", "pw-123")
    assert "pw-123" not in repr(s) and "redis-pw" not in repr(s)
    assert s.redis_address == "redis://u:***@h:6379/0"


@pytest.mark.parametrize("conf, words", [
    ({"ares_etcd_user": "ares"}, "ares_etcd_user and ares_etcd_password"),
    ({"ares_etcd_password": "pw"}, "ares_etcd_user and ares_etcd_password"),
    ({"ares_etcd_user": "", "ares_etcd_password": "pw"}, "non-empty"),
    ({"ares_etcd_endpoints": ["http://a:1", "https://b:1"]}, "mixes"),
    ({"ares_etcd_endpoints": ["grpc://a:1"]}, "not http or https"),
    ({"ares_etcd_ca_cert": "/nonexistent/ca.pem"}, "ares_etcd_ca_cert"),
    ({"broker_url": "rediss://h:6380/0"}, "ssl_cert_reqs"),
])
def test_contradictions_are_refused(conf, words):
    with pytest.raises(ConfigurationError, match=words):
        settings(**conf)


def test_certificate_needs_its_key_and_https(pem):
    with pytest.raises(ConfigurationError, match="ares_etcd_key"):
        settings(ares_etcd_cert=pem["cert"])
    with pytest.raises(ConfigurationError, match="https://"):
        settings(ares_etcd_endpoints=["http://e1:2379"],
                 ares_etcd_ca_cert=pem["ca"])


def test_bad_broker_url_error_hides_its_password():
    with pytest.raises(ConfigurationError) as failure:
        settings(broker_url="amqp://guest:hunter2@mq:5672//")
    assert "hunter2" not in str(failure.value)
