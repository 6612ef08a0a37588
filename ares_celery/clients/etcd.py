"""The one place that talks to etcd.

We use ``etcd3gw`` (etcd's JSON gRPC-gateway over plain HTTP):
it is maintained (OpenStack), has no protobuf/grpc dependency (python-etcd3
breaks on current protobuf) and is synchronous, so it is safe in prefork pool
children without an event loop or gRPC's fork caveats. Everything else in the
package goes through :class:`EtcdGateway`, so swapping the client means
changing only this module (or subclassing it: pool processes, which never
fork, run the hot path's unary calls over gRPC with
:mod:`ares_celery.clients.etcd_grpc`). Unary calls ride :class:`KeepAliveSession`
instead of ``requests`` (which etcd3gw accepts as its session): the etcd
round trip is on every job's critical path.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from ..errors import AuthenticationFailed, ServiceUnavailable
from .etcd_endpoints import parse_endpoints
from .etcd_failures import Failure, error_text, unreachable_message, why
from .etcd_security import EtcdSecurity, TokenCache, token_rejected

_TRANSIENT = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
)


def b64(data: str | bytes) -> str:
    """etcd's JSON gateway wants keys and values base64-encoded."""
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode("ascii")


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


@dataclass(frozen=True)
class KeyValue:
    """A decoded etcd key-value with the revisions fencing relies on."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(kv.get("key")).decode(),
            value=_unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by a watch: the key-value after a PUT, or the key
    (with its last revisions) that a DELETE removed; ``prev`` is the
    key-value before the change, when the watch asked for it."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev: KeyValue | None = None


@dataclass(frozen=True)
class WatchBatch:
    """What one watch response carried. ``restart`` means the stream can no
    longer be trusted to be complete (etcd canceled it or compacted the
    history it would replay): the reader must list again."""

    events: list[WatchEvent]
    restart: bool = False


@dataclass(frozen=True)
class TxnResult:
    """Outcome of one etcd transaction."""

    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]

    def previous(self) -> list[KeyValue | None]:
        """The key-value each put op (asked with ``prev_kv``) replaced, in
        order; None where the key did not exist."""
        out: list[KeyValue | None] = []
        for resp in self.responses:
            if "response_put" in resp:
                prev = resp["response_put"].get("prev_kv")
                out.append(KeyValue.from_json(prev) if prev else None)
        return out

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each range op in the executed branch, in order."""
        out = []
        for resp in self.responses:
            if "response_range" in resp:
                kvs = resp["response_range"].get("kvs", [])
                out.append([KeyValue.from_json(kv) for kv in kvs])
        return out


# -- transaction building blocks (etcd v3 JSON gateway shapes) ------------


def cmp_create_revision(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(revision)}


def cmp_version(key: str, version: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "VERSION", "result": "EQUAL",
            "version": str(version)}


def cmp_value(key: str, value: str | bytes) -> dict[str, Any]:
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL",
            "value": b64(value)}


#: etcd refuses a Txn with more operations than this in one branch
#: (``--max-txn-ops``, 128 by default) with INVALID_ARGUMENT; writers whose
#: op count grows with load (committed jobs' deletes, a worker's held
#: messages) stay within it.
MAX_TXN_OPS = 128


def op_put(key: str, value: str | bytes, lease: int = 0,
           prev_kv: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    if prev_kv:
        body["prev_kv"] = True
    return {"request_put": body}


def op_range(key: str, prefix: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return {"request_range": body}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def prefix_end(prefix: str) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


class _Response:
    """The part of ``requests.Response`` that etcd3gw reads."""

    def __init__(self, status: int, reason: str, data: bytes) -> None:
        self.status_code = status
        self.reason = reason or ""
        self._data = data

    @property
    def text(self) -> str:
        return self._data.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self._data)


class KeepAliveSession:
    """A ``requests.Session`` stand-in for etcd3gw's unary calls.

    One kept-alive ``http.client`` connection per endpoint (the gateway
    keeps one session per thread). Measured on loopback it needs a third of
    the client CPU of urllib3's pool (0.24 vs 0.66 ms per call): the request
    goes out in a single ``send`` (headers and body together) with
    ``TCP_NODELAY``, and nothing else runs per call. A connection the
    server closed while idle is noticed *before* sending and replaced; a
    failure after sending is never retried here, because a Txn is not
    idempotent. Errors are raised as the ``requests`` exceptions etcd3gw
    translates.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._conns: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def post(self, url: str, data: Any = None, json: Any = None,
             timeout: float | None = None,
             headers: dict[str, str] | None = None, **_: Any) -> _Response:
        body = data if json is None else _json_dumps(json)
        if isinstance(body, str):
            body = body.encode()
        parts = urllib.parse.urlsplit(url)
        key = (parts.hostname or "", parts.port or 80)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        try:
            conn = self._connection(key, timeout)
            conn.request("POST", parts.path, body=body, headers=all_headers)
            raw = conn.getresponse()
            payload = raw.read()
        except TimeoutError as exc:
            self._drop(key)
            raise requests.exceptions.Timeout(f"{url}: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            self._drop(key)
            raise requests.exceptions.ConnectionError(
                f"{url}: {exc or type(exc).__name__}") from exc
        if raw.will_close:
            self._drop(key)
        return _Response(raw.status, raw.reason, payload)

    def _connection(self, key: tuple[str, int],
                    timeout: float | None) -> http.client.HTTPConnection:
        conn = self._conns.get(key)
        if conn is not None and conn.sock is not None and _dropped(conn.sock):
            self._drop(key)
            conn = None
        if conn is None:
            host, port = key
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                   context=self._ssl)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns[key] = conn
        elif conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, key: tuple[str, int]) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.close()


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or sent
    something unasked): either way it cannot carry our next request."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def tls_context(ca_cert: str | None, cert: str | None,
                key: str | None) -> ssl.SSLContext:
    """Verify etcd against ``ca_cert`` (else the system CAs) and present
    the client certificate if one is configured."""
    context = ssl.create_default_context(cafile=ca_cert)
    if cert:
        context.load_cert_chain(cert, key)
    return context


_json_dumps = json.dumps


#: etcd answers these while it elects a leader or is still starting (its
#: HTTP gateway routes /v3/* only once the server is up: a 404 meanwhile).
_TRANSIENT_DETAILS = ("no leader", "timed out", "leader changed",
                      "too many requests", "not capable", "unhealthy",
                      "stopped")
_TRANSIENT_REASONS = ("Not Found", "Bad Gateway", "Service Unavailable",
                      "Gateway Timeout")


def _transient(exc: Exception, detail: str) -> bool:
    """Whether an etcd error means "this endpoint cannot serve right now"
    (try the next one, or report ServiceUnavailable) rather than a refusal."""
    if any(marker in detail for marker in _TRANSIENT_DETAILS):
        return True
    # A JSON body is etcd's own answer (a gRPC status such as "lease not
    # found", also sent as 404); plain text comes from the HTTP layer.
    return str(exc) in _TRANSIENT_REASONS and \
        not detail.lstrip().startswith("{")


def _detail(exc: Exception) -> str:
    return getattr(exc, "detail_text", None) or str(exc)


class EtcdGateway:
    """Thread-safe etcd access with endpoint fail-over.

    One instance per process (``requests`` sessions must not cross a fork);
    a connection error moves on to the next endpoint, and only when every
    endpoint failed does the caller see :class:`ServiceUnavailable` naming
    them all, so callers can fail closed with a useful message.
    """

    #: How the unary calls reach etcd. The seam for another transport:
    #: :class:`~ares_celery.clients.etcd_grpc.GrpcEtcdGateway` subclasses
    #: this class and says ``"grpc"`` (``etcd_grpc.process_gateway``
    #: chooses per process, from ``ares_etcd_transport``).
    transport: str = "http"

    def __init__(self, endpoints: str | Iterable[str], timeout: float = 2.0,
                 security: EtcdSecurity | None = None) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self.security = security or EtcdSecurity()
        self._local = threading.local()
        self._preferred = 0
        self.tokens = TokenCache(self.security, self._login)

    @property
    def address(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _client(self, index: int) -> Etcd3Client:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(index)
        if client is None:
            host, port = self.endpoints[index]
            sec = self.security
            session = KeepAliveSession(
                tls_context(sec.ca_cert, sec.cert, sec.key)
                if sec.tls else None)
            client = Etcd3Client(host=host, port=port, protocol=sec.protocol,
                                 timeout=self.timeout, api_path="/v3/",
                                 session=session)
            clients[index] = client
        return client

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with the auth token; a rejected token is renewed once."""
        token = self.tokens.current()
        try:
            return self._post_any(path, body, token)
        except etcd_exc.Etcd3Exception as exc:
            if not token_rejected(_detail(exc)):
                raise
            if not self.tokens.enabled:
                raise AuthenticationFailed(
                    f"etcd at {self.address} requires authentication: set "
                    "ares_etcd_user and ares_etcd_password") from None
        return self._post_any(path, body, self.tokens.refresh(token))

    def _login(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._post_any("/auth/authenticate", body, None)
        except etcd_exc.Etcd3Exception as exc:
            detail = _detail(exc)
            if "authentication is not enabled" in detail:
                return {}
            raise AuthenticationFailed(
                f"etcd at {self.address} refused user {body['name']!r}: "
                f"{error_text(detail)}; check ares_etcd_user and "
                "ares_etcd_password") from None

    def _post_any(self, path: str, body: dict[str, Any],
                  token: str | None) -> dict[str, Any]:
        """POST to the preferred endpoint, failing over to the others."""
        failures = []
        count = len(self.endpoints)
        start = self._preferred
        for step in range(count):
            index = (start + step) % count
            try:
                result = self._post_one(index, path, body, token)
            except _TRANSIENT as exc:
                failures.append(self._failure(index, exc))
                continue
            except etcd_exc.Etcd3Exception as exc:
                detail = _detail(exc)
                if _transient(exc, detail):
                    failures.append(self._failure(index, exc))
                    continue
                if "permission denied" in detail:
                    raise AuthenticationFailed(
                        f"etcd at {self.address}: user "
                        f"{self.security.user!r} may not {path}: grant it "
                        "read/write on the ares key prefix") from None
                raise
            self._preferred = index
            return result
        raise ServiceUnavailable(
            unreachable_message(failures, self.timeout))

    def _post_one(self, index: int, path: str, body: dict[str, Any],
                  token: str | None) -> dict[str, Any]:
        client = self._client(index)
        return client.post(client.get_url(path), data=json.dumps(body),
                           headers={"Authorization": token} if token else {})

    def _failure(self, index: int, exc: Exception) -> Failure:
        host, port = self.endpoints[index]
        reason, kind = why(exc, self.timeout)
        host = f"[{host}]" if ":" in host else host
        return Failure(f"{host}:{port}", reason, kind)

    # -- kv --------------------------------------------------------------

    def txn(self, compare: Sequence[dict[str, Any]],
            success: Sequence[dict[str, Any]],
            failure: Sequence[dict[str, Any]] = ()) -> TxnResult:
        """Run one transaction: the unit every atomic step is built on."""
        resp = self._post("/kv/txn", {"compare": list(compare),
                                      "success": list(success),
                                      "failure": list(failure)})
        return TxnResult(
            succeeded=bool(resp.get("succeeded", False)),
            revision=int(resp.get("header", {}).get("revision", 0)),
            responses=resp.get("responses", []) or [],
        )

    def get(self, key: str) -> KeyValue | None:
        resp = self._post("/kv/range", {"key": b64(key)})
        kvs = resp.get("kvs") or []
        return KeyValue.from_json(kvs[0]) if kvs else None

    def range_prefix_with_revision(self, prefix: str, keys_only: bool = False
                                   ) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` (without values if ``keys_only``) and
        the revision they were read at, so a watch can continue from
        exactly there."""
        resp = self._post("/kv/range", {"key": b64(prefix),
                                        "range_end": b64(prefix_end(prefix)),
                                        "keys_only": keys_only})
        kvs = [KeyValue.from_json(kv) for kv in resp.get("kvs") or []]
        return kvs, int(resp.get("header", {}).get("revision", 0))

    def watch_prefix(self, prefix: str, start_revision: int,
                     prev_kv: bool = False,
                     deletes_only: bool = False) -> WatchStream:
        """A stream of changes under ``prefix`` from ``start_revision`` on,
        from the endpoint that answered last, with the same TLS files and
        auth token as unary calls (``prev_kv``: each event carries the
        key-value it replaced or deleted; ``deletes_only``: etcd leaves PUT
        events out, the NOPUT filter). Raises
        :class:`ServiceUnavailable` if the stream cannot be opened."""
        host, port = self.endpoints[self._preferred]
        session = requests.Session()
        session.trust_env = False
        sec = self.security
        if sec.ca_cert is not None:
            session.verify = sec.ca_cert
        if sec.cert is not None and sec.key is not None:
            session.cert = (sec.cert, sec.key)
        session.headers.update(self.tokens.header())
        host = f"[{host}]" if ":" in host else host
        url = f"{sec.protocol}://{host}:{port}/v3/watch"
        body = {"create_request": {
            "key": b64(prefix), "range_end": b64(prefix_end(prefix)),
            "start_revision": str(start_revision), "prev_kv": prev_kv}}
        if deletes_only:
            body["create_request"]["filters"] = ["NOPUT"]
        try:
            response = session.post(url, json=body, stream=True,
                                    timeout=(self.timeout, None))
        except requests.exceptions.RequestException as exc:
            session.close()
            reason, kind = why(exc, self.timeout)
            raise ServiceUnavailable(unreachable_message(
                [Failure(f"{host}:{port}", reason, kind)], self.timeout,
                what="etcd watch unavailable")) from exc
        return WatchStream(session, response, self._preferred)

    def answers(self, endpoint: int, key: str) -> bool:
        """Does the endpoint at index ``endpoint`` serve a linearizable
        read of ``key`` within the timeout? A member that is stopped (a
        paused VM) or cut off from the quorum keeps a watch stream open and
        silent; only a question shows it. No failover: it is this
        endpoint that is asked about. A refusal (an expired auth token) is
        an answer too; "cannot serve now" (no leader, timed out) is not."""
        try:
            self._post_one(endpoint, "/kv/range",
                           {"key": b64(key), "count_only": True},
                           self.tokens.current())
        except _TRANSIENT:
            return False
        except etcd_exc.Etcd3Exception as exc:
            return not _transient(exc, _detail(exc))
        return True

    def count_prefix(self, prefix: str) -> int:
        resp = self._post("/kv/range", {
            "key": b64(prefix), "range_end": b64(prefix_end(prefix)),
            "count_only": True})
        return int(resp.get("count", 0))

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        body = op_put(key, value, lease)["request_put"]
        resp = self._post("/kv/put", body)
        return int(resp.get("header", {}).get("revision", 0))

    def delete(self, key: str) -> int:
        resp = self._post("/kv/deleterange", {"key": b64(key)})
        return int(resp.get("deleted", 0))

    def delete_prefix(self, prefix: str) -> int:
        resp = self._post("/kv/deleterange", {
            "key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return int(resp.get("deleted", 0))

    # -- leases ----------------------------------------------------------

    def grant_lease(self, ttl: int) -> int:
        resp = self._post("/lease/grant", {"TTL": str(int(ttl)), "ID": "0"})
        if resp.get("error"):
            raise ServiceUnavailable(f"etcd at {self.address} refused a "
                                     f"lease: {resp['error']}")
        return int(resp["ID"])

    def refresh_lease(self, lease_id: int) -> int:
        """Keep a lease alive; returns its new TTL, or -1 if it expired."""
        resp = self._post("/lease/keepalive", {"ID": str(lease_id)})
        return int(resp.get("result", {}).get("TTL", -1))

    def lease_ttl(self, lease_id: int) -> int:
        resp = self._post("/kv/lease/timetolive", {"ID": str(lease_id)})
        return int(resp.get("TTL", -1))

    def revoke_lease(self, lease_id: int) -> None:
        try:
            self._post("/kv/lease/revoke", {"ID": str(lease_id)})
        except etcd_exc.Etcd3Exception:
            pass  # already expired: nothing left to revoke

    # -- health ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Cluster member status; proves a member answers requests."""
        return self._post("/maintenance/status", {})


class WatchStream:
    """An open ``/v3/watch`` stream: iterate for batches of events; close it
    from any thread to stop the reader."""

    def __init__(self, session: requests.Session,
                 response: requests.Response, endpoint: int = 0) -> None:
        self._session = session
        self._response = response
        #: Index of the endpoint serving the stream (see ``answers``).
        self.endpoint = endpoint

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._response.close()
        self._session.close()

    def __iter__(self) -> Iterator[WatchBatch]:
        for message in _json_messages(self._response):
            result = message.get("result", {})
            if result.get("canceled") or result.get("compact_revision"):
                yield WatchBatch([], restart=True)
                return
            events = []
            for event in result.get("events") or []:
                kv = KeyValue.from_json(event.get("kv", {}))
                prev = event.get("prev_kv")
                events.append(WatchEvent(
                    "DELETE" if event.get("type") == "DELETE" else "PUT", kv,
                    KeyValue.from_json(prev) if prev else None))
            if events:
                yield WatchBatch(events)

    def close(self) -> None:
        """Wake the thread blocked reading the stream.

        Closing the response from another thread would wait for that
        reader's buffer lock forever; shutting the socket down makes its
        ``recv`` return at once (etcd3gw's watcher does the same).
        """
        try:
            fd = self._response.raw._fp.fileno()  # noqa: SLF001 - no public handle
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError, ValueError):
            pass


def _json_messages(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Watch responses as they arrive.

    ``iter_lines()`` buffers up to its chunk size before yielding, which
    would hold small watch events back until more traffic comes; read
    chunks as the server flushes them and split complete JSON lines.
    """
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while True:
            line, sep, rest = buffer.partition(b"\n")
            if not sep:
                break
            buffer = rest
            if line.strip():
                yield json.loads(line)
        if buffer.strip():
            try:
                message = json.loads(buffer)
            except ValueError:
                continue  # an incomplete message: wait for the rest
            buffer = b""
            yield message
