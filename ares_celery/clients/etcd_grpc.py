"""etcd over gRPC in processes that never fork: the lock Txn in a third of
the time.

Every job's lock Txn is on its critical path. Through etcd's JSON gateway
(:class:`~ares_celery.clients.etcd.EtcdGateway`, HTTP/1.1) it costs about
three times what the same Txn costs over etcd's native gRPC API, mostly in
JSON and base64 on both ends. gRPC, though, is not fork-safe: a channel (its
sockets, its polling threads) must not exist in a process that forks, or
the child inherits a broken copy. Celery's prefork main process forks new
pool children for its whole life, so the rule here is:

* gRPC only in a process that said it will not fork: a prefork pool child,
  marked by Celery's ``worker_process_init`` signal (see
  :func:`mark_fork_free`, wired in :class:`~ares_celery.services.Services`).
  The channel is created there, after the fork, on first use.
* Everywhere else (the worker's main process, solo and threads pools,
  clients, beat, the CLI) the HTTP gateway, and ``grpc`` is not even
  imported.

:class:`GrpcEtcdGateway` *is* an :class:`EtcdGateway`: the unary calls the
hot path makes (``txn``, ``get``, ``put``, ``delete``, the lease calls) go
over gRPC, the rest (watches, prefix listings, status, the auth login)
stay on HTTP. If gRPC cannot be used (the package is missing or does not
import, or etcd answers over HTTP but the channel does not connect) the
process falls back to HTTP and says so once in the log, unless
``ares_etcd_transport = "grpc"`` asked for gRPC or nothing.

The client library is ``python3-etcd3`` (a maintained fork of
python-etcd3 with code generated for protobuf 5.29+): we use only its
generated stubs and messages, not its client class, so endpoint fail-over,
auth tokens, TLS and error messages are the same code paths as over HTTP.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from etcd3gw import exceptions as etcd_exc

from ..errors import AuthenticationFailed, ConfigurationError, ServiceUnavailable
from .etcd import EtcdGateway, KeyValue, TxnResult
from .etcd_failures import Failure, unreachable_message
from .etcd_security import EtcdSecurity, token_rejected

logger = logging.getLogger(__name__)

SETTING = "ares_etcd_transport"
TRANSPORTS = ("auto", "grpc", "http")

#: The distributions gRPC needs (``pip install python3-etcd3`` brings both).
_MODULES = ("grpc", "etcd3")

#: etcd errors that mean "this endpoint cannot serve now" (as over HTTP).
_TRANSIENT_DETAILS = ("no leader", "timed out", "leader changed",
                      "too many requests", "not capable", "unhealthy",
                      "stopped")

_fork_free_pid: int | None = None


def mark_fork_free() -> None:
    """Declare that this process will not fork (a prefork pool child): it
    may then hold gRPC channels. Connected to ``worker_process_init``."""
    global _fork_free_pid
    _fork_free_pid = os.getpid()


def fork_free() -> bool:
    """Whether this very process was marked by :func:`mark_fork_free` (a
    process forked from a marked one is not)."""
    return _fork_free_pid == os.getpid()


def check_transport(value: Any) -> str:
    """The ``ares_etcd_transport`` setting: ``"auto"`` (gRPC in pool
    children when it works, else HTTP), ``"grpc"`` (gRPC in pool children
    or an error) or ``"http"`` (never gRPC). Checked without importing
    ``grpc``: the process reading settings may fork later."""
    if value not in TRANSPORTS:
        raise ConfigurationError(
            f"{SETTING} must be 'auto', 'grpc' or 'http', got {value!r}")
    if value == "grpc":
        missing = [m for m in _MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigurationError(
                f"{SETTING}='grpc' needs the {' and '.join(missing)} "
                "module(s): pip install python3-etcd3 grpcio, or set it to "
                "'auto' (gRPC when available) or 'http'")
    return value


class _Loaded:
    """``grpc`` and the generated stubs, imported once per process."""

    def __init__(self) -> None:
        from . import etcd_grpc_codec as codec
        from . import etcd_grpc_runtime as runtime

        grpc = runtime.grpc
        self.grpc = grpc
        self.rpc = runtime.rpc_pb2
        self.stubs = runtime.rpc_pb2_grpc
        self.codec = codec
        #: Codes after which another endpoint (or a later try) may answer.
        self.transient_codes = (grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.DEADLINE_EXCEEDED)


_loaded: _Loaded | None = None
_load_error: tuple[int, str] | None = None
_load_guard = threading.Lock()


def _load() -> _Loaded | None:
    """The gRPC modules, or None (logged once per process) if they do not
    import; never called in a process that may fork."""
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    with _load_guard:
        if _load_error is not None and _load_error[0] == os.getpid():
            return None
        try:
            _loaded = _Loaded()
        except Exception as exc:  # noqa: BLE001 - any import failure: HTTP
            _load_error = (os.getpid(), f"{type(exc).__name__}: {exc}")
            logger.warning("ares: etcd over gRPC unavailable (%s); this "
                           "process uses the HTTP gateway", _load_error[1])
            return None
        return _loaded


def process_gateway(endpoints: str | Iterable[str], timeout: float = 2.0,
                    security: EtcdSecurity | None = None,
                    transport: str = "auto") -> EtcdGateway:
    """The etcd client this process should use: gRPC in a fork-free
    process unless ``transport`` is ``"http"``, else the HTTP gateway."""
    if transport == "http" or not fork_free():
        return EtcdGateway(endpoints, timeout, security)
    if _load() is None:
        if transport == "grpc":
            raise ConfigurationError(
                f"{SETTING}='grpc' but gRPC does not import here: "
                f"{_load_error[1] if _load_error else 'unknown error'}")
        return EtcdGateway(endpoints, timeout, security)
    return GrpcEtcdGateway(endpoints, timeout, security,
                           required=transport == "grpc")


class _TokenRejected(Exception):
    """etcd refused the auth token (or its absence): log in again."""


class _Stubs:
    """The KV and Lease stubs of one endpoint's channel."""

    def __init__(self, loaded: _Loaded, channel: Any) -> None:
        self.channel = channel
        self.kv = loaded.stubs.KVStub(channel)
        self.lease = loaded.stubs.LeaseStub(channel)


class GrpcEtcdGateway(EtcdGateway):
    """:class:`EtcdGateway` with its hot-path unary calls over gRPC.

    One channel per endpoint, created in this process on first use (gRPC
    channels are thread-safe: every thread shares them). The first call
    waits for a channel to connect; if none does but etcd answers over
    HTTP, gRPC is given up for this process's life (``required``: raised
    instead). Endpoint fail-over, the auth token (logged in over HTTP, sent
    as gRPC metadata) and error messages match the HTTP gateway's.
    """

    def __init__(self, endpoints: str | Iterable[str], timeout: float = 2.0,
                 security: EtcdSecurity | None = None,
                 required: bool = False) -> None:
        super().__init__(endpoints, timeout, security)
        self._required = required
        self._pid = os.getpid()
        self._stubs: dict[int, _Stubs] = {}
        self._stubs_guard = threading.Lock()
        self._state = "unknown"          # then "grpc" or "http"
        self._probe_guard = threading.Lock()
        #: Calls that went over gRPC (tests and benchmarks read it).
        self.grpc_calls = 0

    @property
    def transport(self) -> str:  # type: ignore[override]
        """``"grpc"`` unless this process fell back to HTTP (or is a fork
        of the one that built the gateway)."""
        if self._state == "http" or os.getpid() != self._pid:
            return "http"
        return "grpc"

    # -- channels ----------------------------------------------------------

    def _stub(self, index: int) -> _Stubs:
        stubs = self._stubs.get(index)
        if stubs is None:
            with self._stubs_guard:
                stubs = self._stubs.get(index)
                if stubs is None:
                    loaded = _load()
                    assert loaded is not None  # noqa: S101 - set at creation
                    stubs = self._stubs[index] = _Stubs(
                        loaded, self._channel(loaded, index))
        return stubs

    def _channel(self, loaded: _Loaded, index: int) -> Any:
        grpc = loaded.grpc
        host, port = self.endpoints[index]
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options = [("grpc.enable_http_proxy", 0),   # as the HTTP gateway
                   ("grpc.max_receive_message_length", -1),
                   # gRPC's default backoff grows to 2 minutes: a child
                   # would stay cut off that long after an etcd restart.
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        sec = self.security
        if not sec.tls:
            return grpc.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(sec.ca_cert),
            private_key=_read(sec.key), certificate_chain=_read(sec.cert))
        return grpc.secure_channel(target, credentials, options=options)

    def _use_grpc(self) -> bool:
        if self._state == "grpc":
            return os.getpid() == self._pid
        if self._state == "http" or os.getpid() != self._pid:
            return False
        with self._probe_guard:
            if self._state == "unknown":
                self._probe()
        return self._state == "grpc"

    def _probe(self) -> None:
        """Try each endpoint's channel until one connects (nothing is sent
        before: a request that might have been applied is never re-sent
        over HTTP). None did: if HTTP answers, gRPC is what fails here, so
        fall back for good; if HTTP does not either, etcd is away: raise,
        and probe again on the next call."""
        loaded = _load()
        assert loaded is not None  # noqa: S101 - checked at creation
        count = len(self.endpoints)
        for step in range(count):
            index = (self._preferred + step) % count
            if self._connects(loaded, self._stub(index).channel):
                self._preferred = index
                self._state = "grpc"
                return
        super().status()      # raises ServiceUnavailable if etcd is away
        if self._required:
            raise ServiceUnavailable(
                f"etcd at {self.address} answers over HTTP but its gRPC "
                f"channel did not connect within {self.timeout:g}s; "
                f"{SETTING}='grpc' requires gRPC: set it to 'auto' to fall "
                "back to HTTP")
        logger.warning("ares: etcd at %s answers over HTTP but not over "
                       "gRPC (no channel connected within %gs); this "
                       "process uses the HTTP gateway", self.address,
                       self.timeout)
        self._state = "http"
        for stubs in self._stubs.values():
            stubs.channel.close()
        self._stubs.clear()

    def _connects(self, loaded: _Loaded, channel: Any) -> bool:
        """Whether ``channel`` gets READY within the timeout. An attempt
        seen failing (connecting, then refused, TLS or not HTTP/2) ends the
        wait at once; a failure left from an earlier attempt (etcd was
        away) does not: the channel retries within a second."""
        states = loaded.grpc.ChannelConnectivity
        seen: list[Any] = []
        settled = threading.Event()

        def watch(state: Any) -> None:
            seen.append(state)
            if state is states.READY or state is states.SHUTDOWN or (
                    state is states.TRANSIENT_FAILURE
                    and states.CONNECTING in seen):
                settled.set()

        channel.subscribe(watch, try_to_connect=True)
        try:
            settled.wait(self.timeout)
        finally:
            channel.unsubscribe(watch)
        return states.READY in seen

    # -- calls ---------------------------------------------------------------

    def _call(self, what: str, call: Callable[[_Stubs, Any], Any]) -> Any:
        """``call(stubs, metadata)`` with the auth token; a rejected token
        is renewed once (as :meth:`EtcdGateway._post` does)."""
        token = self.tokens.current()
        try:
            return self._call_any(what, call, token)
        except _TokenRejected:
            if not self.tokens.enabled:
                raise AuthenticationFailed(
                    f"etcd at {self.address} requires authentication: set "
                    "ares_etcd_user and ares_etcd_password") from None
        try:
            return self._call_any(what, call, self.tokens.refresh(token))
        except _TokenRejected:
            raise AuthenticationFailed(
                f"etcd at {self.address} rejected the auth token of user "
                f"{self.security.user!r} just issued") from None

    def _call_any(self, what: str, call: Callable[[_Stubs, Any], Any],
                  token: str | None) -> Any:
        """Call the preferred endpoint, failing over to the others."""
        loaded = _load()
        assert loaded is not None  # noqa: S101 - checked at creation
        metadata = (("token", token),) if token else None
        failures = []
        count = len(self.endpoints)
        start = self._preferred
        for step in range(count):
            index = (start + step) % count
            try:
                result = call(self._stub(index), metadata)
            except loaded.grpc.RpcError as exc:
                code, detail = exc.code(), exc.details() or ""
                if code in loaded.transient_codes or any(
                        marker in detail for marker in _TRANSIENT_DETAILS):
                    failures.append(self._grpc_failure(index, code, detail))
                    continue
                if token_rejected(detail) or (
                        "permission denied" in detail
                        and not self.tokens.enabled):
                    # Without a token etcd answers gRPC with "permission
                    # denied" where the gateway says "user name is empty".
                    raise _TokenRejected() from None
                if "permission denied" in detail:
                    raise AuthenticationFailed(
                        f"etcd at {self.address}: user "
                        f"{self.security.user!r} may not {what}: grant it "
                        "read/write on the ares key prefix") from None
                # What the HTTP gateway raises for the same refusal.
                raise etcd_exc.Etcd3Exception(
                    json.dumps({"error": detail, "code": code.value[0]}),
                    code.name) from None
            self._preferred = index
            self.grpc_calls += 1
            return result
        raise ServiceUnavailable(unreachable_message(failures, self.timeout))

    def _grpc_failure(self, index: int, code: Any, detail: str) -> Failure:
        host, port = self.endpoints[index]
        host = f"[{host}]" if ":" in host else host
        text = detail.lower()
        if code.name == "DEADLINE_EXCEEDED" or "timed out" in text:
            reason, kind = f"timed out after {self.timeout:g}s", "timeout"
        elif "connection refused" in text:
            reason, kind = "connection refused", "refused"
        elif "dns" in text or "resolve" in text:
            reason, kind = f"host name not resolved ({detail})", "dns"
        elif "ssl" in text or "tls" in text or "handshake" in text \
                or "certificate" in text:
            reason, kind = f"TLS failed ({detail})", "tls"
        else:
            reason, kind = detail or code.name, "other"
        return Failure(f"{host}:{port}", f"{reason} (gRPC)", kind)

    # -- kv --------------------------------------------------------------------

    def txn(self, compare: Sequence[dict[str, Any]],
            success: Sequence[dict[str, Any]],
            failure: Sequence[dict[str, Any]] = ()) -> TxnResult:
        if not self._use_grpc():
            return super().txn(compare, success, failure)
        codec = _load().codec
        request = codec.txn_message(compare, success, failure)
        response = self._call("/kv/txn", lambda s, md: s.kv.Txn(
            request, timeout=self.timeout, metadata=md))
        return codec.txn_result(response)

    def get(self, key: str) -> KeyValue | None:
        if not self._use_grpc():
            return super().get(key)
        loaded = _load()
        request = loaded.rpc.RangeRequest(key=key.encode())
        response = self._call("/kv/range", lambda s, md: s.kv.Range(
            request, timeout=self.timeout, metadata=md))
        return loaded.codec.key_value(response.kvs[0]) if response.kvs \
            else None

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        if not self._use_grpc():
            return super().put(key, value, lease)
        request = _load().rpc.PutRequest(
            key=key.encode(),
            value=value.encode() if isinstance(value, str) else value,
            lease=lease)
        response = self._call("/kv/put", lambda s, md: s.kv.Put(
            request, timeout=self.timeout, metadata=md))
        return response.header.revision

    def delete(self, key: str) -> int:
        if not self._use_grpc():
            return super().delete(key)
        request = _load().rpc.DeleteRangeRequest(key=key.encode())
        response = self._call("/kv/deleterange", lambda s, md: s.kv.DeleteRange(
            request, timeout=self.timeout, metadata=md))
        return response.deleted

    # -- leases ------------------------------------------------------------------

    def grant_lease(self, ttl: int) -> int:
        if not self._use_grpc():
            return super().grant_lease(ttl)
        request = _load().rpc.LeaseGrantRequest(TTL=int(ttl), ID=0)
        response = self._call("/lease/grant", lambda s, md: s.lease.LeaseGrant(
            request, timeout=self.timeout, metadata=md))
        if response.error:
            raise ServiceUnavailable(f"etcd at {self.address} refused a "
                                     f"lease: {response.error}")
        return response.ID

    def refresh_lease(self, lease_id: int) -> int:
        """Keep a lease alive; returns its new TTL, or -1 if it expired
        (one request on etcd's keep-alive stream, then the stream ends)."""
        if not self._use_grpc():
            return super().refresh_lease(lease_id)
        request = _load().rpc.LeaseKeepAliveRequest(ID=lease_id)

        def keepalive(stubs: _Stubs, metadata: Any) -> int:
            stream = stubs.lease.LeaseKeepAlive(
                iter((request,)), timeout=self.timeout, metadata=metadata)
            try:
                reply = next(stream, None)
            finally:
                stream.cancel()
            return reply.TTL if reply is not None and reply.TTL > 0 else -1

        return self._call("/lease/keepalive", keepalive)

    def lease_ttl(self, lease_id: int) -> int:
        if not self._use_grpc():
            return super().lease_ttl(lease_id)
        request = _load().rpc.LeaseTimeToLiveRequest(ID=lease_id)
        response = self._call(
            "/kv/lease/timetolive", lambda s, md: s.lease.LeaseTimeToLive(
                request, timeout=self.timeout, metadata=md))
        return response.TTL

    def revoke_lease(self, lease_id: int) -> None:
        if not self._use_grpc():
            super().revoke_lease(lease_id)
            return
        request = _load().rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._call("/kv/lease/revoke", lambda s, md: s.lease.LeaseRevoke(
                request, timeout=self.timeout, metadata=md))
        except etcd_exc.Etcd3Exception:
            pass  # already expired: nothing left to revoke

    def close(self) -> None:
        """Close this process's channels (a later call opens new ones)."""
        if os.getpid() == self._pid:
            for stubs in self._stubs.values():
                stubs.channel.close()
        self._stubs.clear()


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


__all__ = ["TRANSPORTS", "GrpcEtcdGateway", "check_transport", "fork_free",
           "mark_fork_free", "process_gateway"]
