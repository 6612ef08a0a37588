"""etcd over gRPC against real etcd servers and a real prefork worker.

The gRPC gateway must give the same answers as the HTTP one (both
branches of a Txn, ``prev_kv``, keys on leases, etcd's refusals), fall back
to HTTP only when gRPC is what fails, honour TLS and auth, and be used by
pool children only: the worker's main process forks them and must never
load gRPC.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest
from etcd3gw import exceptions as etcd_exc

from ares_celery.clients import etcd_grpc
from ares_celery.clients.etcd import (
    EtcdGateway,
    cmp_create_revision,
    cmp_value,
    op_delete,
    op_put,
    op_range,
)
from ares_celery.clients.etcd_grpc import GrpcEtcdGateway
from ares_celery.clients.etcd_security import EtcdSecurity
from ares_celery.coordination.mutex import JobLocks
from ares_celery.coordination.session import Session
from ares_celery.errors import AuthenticationFailed, ServiceUnavailable
from ares_celery.keys import Keys
from ares_celery.testing import EtcdServer
from ares_celery.testing.certs import make_test_pki
from ares_celery.testing.servers import free_port
from tests.processes import WorkerProcess, wait_for

pytestmark = pytest.mark.integration

ROOT_PASSWORD = "etcd-r00t-pw"


@pytest.fixture()
def grpc_etcd(services):
    gateway = GrpcEtcdGateway([services[1].endpoint])
    yield gateway
    gateway.close()


def test_txn_branches_prev_kv_and_leases_over_grpc(grpc_etcd, etcd):
    lease = grpc_etcd.grant_lease(30)
    lock = "/grpc/lock/job-1"
    record = "/grpc/job/job-1"
    etcd.put(record, "old record")

    def lock_txn(value: str):
        return grpc_etcd.txn(
            compare=[cmp_create_revision(lock, 0)],
            success=[op_put(lock, value, lease),
                     op_put(record, f"record of {value}", prev_kv=True),
                     op_range("/grpc/released/job-1")],
            failure=[op_range(lock)])

    taken = lock_txn("first")
    assert taken.succeeded
    # What HTTP sees: the lock key, created by this Txn, on the lease.
    seen = etcd.get(lock)
    assert seen.create_revision == taken.revision and seen.lease == lease
    assert [kv.value if kv else None for kv in taken.previous()] == \
        [None, b"old record"]
    assert taken.ranges() == [[]]

    lost = lock_txn("second")
    assert not lost.succeeded
    assert lost.ranges() == [[seen]]         # the failure branch's read
    assert etcd.get(record).value == b"record of first"

    # A compare on the value, a delete: the release shape.
    released = grpc_etcd.txn(compare=[cmp_value(lock, "first")],
                             success=[op_delete(lock)])
    assert released.succeeded and etcd.get(lock) is None
    assert grpc_etcd.transport == "grpc" and grpc_etcd.grpc_calls >= 4


def test_unary_calls_and_lease_lifecycle_over_grpc(grpc_etcd, etcd):
    lease = grpc_etcd.grant_lease(30)
    revision = grpc_etcd.put("/grpc/k", "v", lease=lease)
    got = grpc_etcd.get("/grpc/k")
    assert got == etcd.get("/grpc/k") and got.mod_revision == revision
    assert got.lease == lease and 0 < grpc_etcd.lease_ttl(lease) <= 30
    assert grpc_etcd.refresh_lease(lease) == 30
    grpc_etcd.revoke_lease(lease)
    assert etcd.get("/grpc/k") is None       # went with its lease
    assert grpc_etcd.lease_ttl(lease) == -1
    assert grpc_etcd.refresh_lease(lease) == -1
    grpc_etcd.revoke_lease(lease)            # already gone: not an error
    grpc_etcd.put("/grpc/k2", b"\x00\xff")
    assert grpc_etcd.get("/grpc/k2").value == b"\x00\xff"
    assert grpc_etcd.delete("/grpc/k2") == 1
    assert grpc_etcd.delete("/grpc/k2") == 0
    assert grpc_etcd.get("/grpc/k2") is None


def test_job_locks_run_over_grpc(grpc_etcd, etcd):
    """The hot path itself: the session lease, the lock Txn (both
    outcomes) and the release, with HTTP reading what gRPC wrote."""
    keeper = Session(grpc_etcd, 30)
    mine = JobLocks(grpc_etcd, Keys("ares"))
    theirs = JobLocks(grpc_etcd, Keys("ares"))
    try:
        grant = keeper.current()
        taken = mine.acquire("grpc-job", grant)
        assert taken.status == "acquired"
        lock = etcd.get(Keys("ares").lock("grpc-job"))
        assert lock.create_revision == taken.token
        assert lock.lease == grant.lease_id
        held = theirs.acquire("grpc-job", grant)
        assert held.status == "held" and held.holder["pid"] == os.getpid()
        assert taken.lock.release()
        again = theirs.acquire("grpc-job", grant)
        assert again.status == "acquired" and again.token > taken.token
        assert grpc_etcd.transport == "grpc"
    finally:
        keeper.close()


def test_etcd_refusals_raise_what_the_http_gateway_raises(grpc_etcd, etcd):
    duplicate = [op_put("/grpc/dup", "a"), op_put("/grpc/dup", "b")]
    for gateway in (etcd, grpc_etcd):
        with pytest.raises(etcd_exc.Etcd3Exception) as refused:
            gateway.txn(compare=[], success=duplicate)
        assert "duplicate key" in refused.value.detail_text
    with pytest.raises(ServiceUnavailable, match="refused a lease|TTL"):
        try:
            grpc_etcd.grant_lease(10 ** 12)   # etcd: lease TTL too large
        except etcd_exc.Etcd3Exception as exc:
            raise ServiceUnavailable(exc.detail_text) from exc


# -- fallback and outages ------------------------------------------------


class Http1OnlyProxy:
    """A TCP relay to etcd that, like an HTTP/1.1-only load balancer,
    drops connections opening with the HTTP/2 preface (gRPC) and relays
    everything else. etcd itself is the real server behind it."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.listener.getsockname()[1]
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,),
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first = client.recv(65536)
        if first.startswith(b"PRI * HTTP/2.0"):
            self.refused += 1
            client.close()
            return
        upstream = socket.create_connection(self.target)
        upstream.sendall(first)
        threading.Thread(target=_pipe, args=(upstream, client),
                         daemon=True).start()
        _pipe(client, upstream)

    def close(self) -> None:
        self.listener.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture()
def http1_proxy(services):
    proxy = Http1OnlyProxy(services[1].client_port)
    yield proxy
    proxy.close()


def test_grpc_failing_to_connect_falls_back_to_http_logged_once(
        http1_proxy, etcd, caplog):
    gateway = GrpcEtcdGateway([http1_proxy.endpoint])
    with caplog.at_level(logging.WARNING, logger=etcd_grpc.__name__):
        result = gateway.txn(compare=[cmp_create_revision("/fb/k", 0)],
                             success=[op_put("/fb/k", "v")])
        for i in range(5):
            gateway.put(f"/fb/{i}", "x")
    assert result.succeeded and etcd.get("/fb/k").value == b"v"
    assert http1_proxy.refused >= 1           # gRPC was tried
    assert gateway.transport == "http" and gateway.grpc_calls == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "not over gRPC" in warnings[0]
    assert etcd.get("/fb/4").value == b"x"


def test_grpc_required_does_not_fall_back(http1_proxy, etcd):
    gateway = GrpcEtcdGateway([http1_proxy.endpoint], required=True)
    with pytest.raises(ServiceUnavailable,
                       match="ares_etcd_transport='grpc' requires gRPC"):
        gateway.put("/req/k", "v")
    assert etcd.get("/req/k") is None


def test_etcd_away_is_not_mistaken_for_grpc_failing(services, etcd_server,
                                                    etcd):
    """etcd down at the first call: ServiceUnavailable, not a fallback;
    once it is back the process talks gRPC, and after a later outage the
    channel reconnects within a second or so (not gRPC's 2-minute
    default backoff)."""
    gateway = GrpcEtcdGateway([etcd_server.endpoint], timeout=1.0)
    etcd_server.stop()
    try:
        with pytest.raises(ServiceUnavailable, match=etcd_server.endpoint):
            gateway.put("/away/k", "1")
        assert gateway.grpc_calls == 0
    finally:
        etcd_server.start()
    gateway.put("/away/k", "2")
    assert gateway.transport == "grpc" and gateway.grpc_calls == 1
    etcd_server.stop()
    try:
        with pytest.raises(ServiceUnavailable) as away:
            gateway.put("/away/k", "3")
        assert "(gRPC)" in str(away.value) and \
            etcd_server.endpoint in str(away.value)
    finally:
        etcd_server.start()

    def back() -> bool:
        try:
            gateway.put("/away/k", "4")
            return True
        except ServiceUnavailable:
            return False

    wait_for(back, 10, "the gRPC channel to reconnect")
    assert gateway.transport == "grpc"
    assert etcd.get("/away/k").value == b"4"
    gateway.close()


# -- TLS and auth --------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("grpc-pki"))


@pytest.fixture(scope="module")
def tls_auth_etcd(pki):
    with EtcdServer(tls=pki) as server:
        server.enable_auth(ROOT_PASSWORD)
        yield server


def _secured(server: EtcdServer, pki, gateway=GrpcEtcdGateway,
             password: str = ROOT_PASSWORD, cert: bool = True, **kw):
    files = {"ca_cert": str(pki.ca)}
    if cert:
        files.update(cert=str(pki.client_cert), key=str(pki.client_key))
    return gateway([server.endpoint], 2.0, EtcdSecurity(
        protocol="https", user="root", password=password, **files), **kw)


def test_tls_client_certificates_and_auth_token_over_grpc(
        pki, tls_auth_etcd):
    gateway = _secured(tls_auth_etcd, pki)
    lease = gateway.grant_lease(10)
    result = gateway.txn(compare=[cmp_create_revision("/tls/lock", 0)],
                         success=[op_put("/tls/lock", "me", lease)])
    assert result.succeeded and gateway.transport == "grpc"
    assert gateway.grpc_calls == 2 and gateway.tokens.logins == 1
    http = _secured(tls_auth_etcd, pki, gateway=EtcdGateway)
    assert http.get("/tls/lock").lease == lease
    # Auth off and on again invalidates every token: renewed once.
    tls_auth_etcd.disable_auth(ROOT_PASSWORD)
    tls_auth_etcd.enable_auth(ROOT_PASSWORD)
    assert gateway.get("/tls/lock").value == b"me"
    assert gateway.tokens.logins == 2 and gateway.transport == "grpc"
    gateway.close()


def test_tls_and_auth_mistakes_are_the_same_errors_over_grpc(
        pki, tls_auth_etcd):
    with pytest.raises(ServiceUnavailable):      # no client certificate
        _secured(tls_auth_etcd, pki, cert=False).put("/tls/x", "1")
    with pytest.raises(AuthenticationFailed, match="'root'"):
        _secured(tls_auth_etcd, pki, password="not-it").put("/tls/x", "1")
    anonymous = GrpcEtcdGateway([tls_auth_etcd.endpoint], 2.0, EtcdSecurity(
        protocol="https", ca_cert=str(pki.ca), cert=str(pki.client_cert),
        key=str(pki.client_key)))
    with pytest.raises(AuthenticationFailed, match="requires authentication"):
        anonymous.put("/tls/x", "1")
    assert anonymous.transport == "grpc"         # no fallback for that


# -- a real prefork worker -----------------------------------------------


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.redis_only
def test_pool_children_use_grpc_and_the_main_process_does_not(
        services, redis_server):
    from tests.apps import transport_jobs

    worker = WorkerProcess(transport_jobs.app, concurrency=2,
                           module="tests.apps.transport_jobs")
    with worker:
        task = transport_jobs.etcd_transport
        results = [task.apply_async(request_id=f"transport-{uuid.uuid4()}")
                   for _ in range(8)]
        answers = [r.get(timeout=60) for r in results]
        main = worker.proc.pid
        children = {a["pid"] for a in answers}
        assert main not in children
        for answer in answers:
            # The lock Txn of this very job (and the lease grant before
            # it) went over gRPC.
            assert answer["transport"] == "grpc", answer
            assert answer["grpc_calls"] >= 2, answer
        for child in children:
            assert "cygrpc" in _maps(child)
        # The process that forks the children never loaded gRPC.
        assert "cygrpc" not in _maps(main)
