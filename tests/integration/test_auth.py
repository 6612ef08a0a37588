"""Passwords, ACL users and TLS against real, secured Redis and etcd.

Every server here is started with its security switched on (``requirepass``,
an ACL user with the default user disabled, etcd ``auth enable``, TLS with
client certificates) so that a client that forgot a setting fails, and the
jobs run through a real in-process Celery worker.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from ares_celery import Ares, AuthenticationFailed, ServiceUnavailable
from ares_celery.clients.etcd import EtcdGateway
from ares_celery.clients.etcd_security import EtcdSecurity
from ares_celery.testing import EtcdServer, RedisServer
from ares_celery.testing.certs import make_test_pki

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "r3d!s-Secret"
ROOT_PASSWORD = "etcd-r00t-pw"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=["requirepass", "acl-user"])
def secured_redis(request):
    username = "ares" if request.param == "acl-user" else None
    with RedisServer(password=REDIS_PASSWORD, username=username) as server:
        yield server


@pytest.fixture(scope="module")
def auth_etcd():
    with EtcdServer() as server:
        server.enable_auth(ROOT_PASSWORD)
        yield server


@pytest.fixture(scope="module")
def tls_redis(pki):
    with RedisServer(password=REDIS_PASSWORD, username="ares",
                     tls=pki) as server:
        yield server


@pytest.fixture(scope="module")
def tls_etcd(pki):
    with EtcdServer(tls=pki) as server:
        server.enable_auth(ROOT_PASSWORD)
        yield server


def tls_query(pki) -> str:
    return (f"?ssl_cert_reqs=required&ssl_ca_certs={pki.ca}"
            f"&ssl_certfile={pki.client_cert}&ssl_keyfile={pki.client_key}")


def make_app(broker: str, etcd: list[str], **conf):
    """An Ares app whose one task records each execution in Redis."""
    app = Celery(f"auth-{uuid.uuid4().hex[:6]}", broker=broker)
    app.conf.update(
        ares_etcd_endpoints=etcd, ares_lease_ttl=3,
        broker_transport_options={"visibility_timeout": 6},
        ares_gpu_state_dir=os.environ.get("ARES_TEST_STATE_DIR"),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False)
    app.conf.update(conf)
    ares = Ares(app)

    @ares.task(name=f"{app.main}.record")
    def record(x):
        ctx = ares.current()
        with redis.Redis.from_url(broker) as store:
            store.rpush(f"test:exec:{ctx.job_id}", ctx.fencing_token)
        return x * 2

    return app, ares, record


@contextmanager
def worker(app):
    with start_worker(app, pool="threads", concurrency=2,
                      perform_ping_check=False, shutdown_timeout=20):
        yield


def run_once(app, ares, record, broker: str) -> str:
    """Submit one job three times by request id; it runs exactly once.
    Returns the job id."""
    rid = f"auth-{uuid.uuid4().hex}"
    results = [record.apply_async((21,), request_id=rid) for _ in range(3)]
    assert len({r.id for r in results}) == 1
    with worker(app):
        assert results[0].get(timeout=30) == 42
    with redis.Redis.from_url(broker) as store:
        assert store.llen(f"test:exec:{results[0].id}") == 1
    return results[0].id


# -- Redis --------------------------------------------------------------


def test_job_runs_once_with_redis_password(secured_redis, etcd_server):
    broker = f"{secured_redis.url}/0"
    app, ares, record = make_app(broker, [etcd_server.endpoint])
    run_once(app, ares, record, broker)
    # The dedup record and the fenced result went through the same
    # authenticated URL as the broker.
    assert ares.services.redis.ping()


def test_missing_or_wrong_redis_password_is_a_clear_error(secured_redis,
                                                          etcd_server):
    user = secured_redis.username or ""
    for auth in ("", f"{user}:wrong-pass@"):
        broker = f"redis://{auth}127.0.0.1:{secured_redis.port}/0"
        _, _, record = make_app(broker, [etcd_server.endpoint])
        with pytest.raises(AuthenticationFailed) as failure:
            record.apply_async((1,), request_id=f"r-{uuid.uuid4().hex}")
        message = str(failure.value)
        assert f"127.0.0.1:{secured_redis.port}" in message
        assert "wrong-pass" not in message and REDIS_PASSWORD not in message
        assert isinstance(failure.value, ServiceUnavailable)


def test_redis_password_is_redacted_from_settings_and_errors(secured_redis):
    broker = f"{secured_redis.url}/0"
    app, ares, _ = make_app(broker, ["127.0.0.1:1"])
    assert REDIS_PASSWORD not in repr(ares.settings)
    assert REDIS_PASSWORD not in ares.settings.redis_address
    assert "***" in ares.settings.redis_address


# -- etcd auth ----------------------------------------------------------


def root_gateway(server: EtcdServer, password: str = ROOT_PASSWORD,
                 **tls) -> EtcdGateway:
    protocol = "https" if tls else "http"
    return EtcdGateway([server.endpoint], 2.0, EtcdSecurity(
        protocol=protocol, user="root", password=password, **tls))


def test_etcd_gateway_logs_in_once_and_locks_and_commits(
        secured_redis, auth_etcd):
    """A whole job against etcd with auth on: the job lock, the lease and
    the fenced commit (``ares_result_store='etcd'``: a Txn) all carry the
    token, and this process logged in once for all of them."""
    broker = f"{secured_redis.url}/0"
    app, ares, record = make_app(
        broker, [auth_etcd.endpoint], ares_result_store="etcd",
        ares_etcd_user="root", ares_etcd_password=ROOT_PASSWORD)
    job_id = run_once(app, ares, record, broker)
    assert ares.services.etcd.tokens.logins == 1
    stored = root_gateway(auth_etcd).get(ares.services.keys.result(job_id))
    assert stored is not None and b"42" in stored.value


def test_etcd_without_or_with_wrong_credentials_is_a_clear_error(auth_etcd):
    with pytest.raises(AuthenticationFailed, match="requires authentication"):
        EtcdGateway([auth_etcd.endpoint]).get("/anything")
    with pytest.raises(AuthenticationFailed) as failure:
        root_gateway(auth_etcd, password="not-it").get("/anything")
    message = str(failure.value)
    assert "'root'" in message and "ares_etcd_password" in message
    assert "not-it" not in message and auth_etcd.endpoint in message


def test_etcd_token_is_renewed_when_the_server_drops_it(auth_etcd):
    gateway = root_gateway(auth_etcd)
    for i in range(50):
        gateway.put("/auth-test/k", str(i))
    assert gateway.tokens.logins == 1
    # Turning auth off and on again invalidates every issued token.
    auth_etcd.disable_auth(ROOT_PASSWORD)
    auth_etcd.enable_auth(ROOT_PASSWORD)
    assert gateway.get("/auth-test/k").value == b"49"
    assert gateway.tokens.logins == 2


# -- TLS ----------------------------------------------------------------


def test_etcd_over_tls_with_client_certificates(pki, tls_etcd):
    tls = {"ca_cert": str(pki.ca), "cert": str(pki.client_cert),
           "key": str(pki.client_key)}
    gateway = root_gateway(tls_etcd, **tls)
    lease = gateway.grant_lease(5)
    gateway.put("/tls/k", "v", lease=lease)
    assert gateway.get("/tls/k").value == b"v"
    revision = gateway.get("/tls/k").mod_revision
    with gateway.watch_prefix("/tls/", revision) as stream:   # streams too
        batch = next(iter(stream))
    assert [e.kv.value for e in batch.events] == [b"v"]
    with pytest.raises(ServiceUnavailable):   # no client certificate
        root_gateway(tls_etcd, ca_cert=str(pki.ca)).get("/tls/k")
    with pytest.raises(ServiceUnavailable):   # plain http to a TLS port
        root_gateway(tls_etcd).get("/tls/k")


def test_job_runs_once_over_tls_redis_and_etcd(pki, tls_redis, tls_etcd):
    """rediss:// with an ACL user and client certificates for the broker,
    dedup and results; https etcd with client certificates and auth."""
    broker = f"{tls_redis.url}/0{tls_query(pki)}"
    app, ares, record = make_app(
        broker, [f"https://{tls_etcd.endpoint}"],
        ares_etcd_user="root", ares_etcd_password=ROOT_PASSWORD,
        ares_etcd_ca_cert=str(pki.ca), ares_etcd_cert=str(pki.client_cert),
        ares_etcd_key=str(pki.client_key))
    assert ares.settings.etcd_security.protocol == "https"
    run_once(app, ares, record, broker)
    assert ares.services.etcd.tokens.logins == 1
