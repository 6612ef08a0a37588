"""Why an etcd endpoint could not answer, in words an operator can act on.

etcd3gw wraps every connection error in an exception whose ``str()`` is
empty (the text sits in ``detail_text``, the cause two exceptions down the
chain), so a message built from it read ``etcd unreachable at
127.0.0.1:2379: 127.0.0.1:2379: ``. Here the chain is searched for the
operating system's own error and turned into a short reason ("connection
refused", "timed out after 2.0s") and a hint naming what to check and which
``ares_*`` setting to change.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import requests
from etcd3gw import exceptions as etcd_exc

#: What to check for each kind of failure (the kinds ``why`` returns).
_HINTS = {
    "refused": "Is etcd running and listening on that address?",
    "timeout": "Is that address reachable from here (firewall, wrong "
               "host)? If etcd is only slow, raise ares_etcd_timeout.",
    "dns": "Is the host name in ares_etcd_endpoints right?",
    "tls": "Do ares_etcd_ca_cert, ares_etcd_cert and ares_etcd_key match "
           "the server, and do the endpoints say https:// only when etcd "
           "serves TLS?",
    "http": "Is that etcd's client port (not another HTTP server), and has "
            "etcd finished starting? It answers /v3/ only once it is up "
            "and has a leader.",
    "other": "Is etcd running there?",
}


@dataclass(frozen=True)
class Failure:
    """One endpoint's failure: where, why (short), and which hint fits."""

    address: str
    reason: str
    kind: str


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _os_error(exc: BaseException) -> OSError | None:
    """The operating system's error under the client libraries' wrappers
    (``requests`` exceptions are ``OSError`` subclasses too: skip them)."""
    for link in _chain(exc):
        if isinstance(link, OSError) \
                and not isinstance(link, requests.RequestException):
            return link
    return None


def _timed_out(exc: BaseException) -> bool:
    return any(isinstance(link, (TimeoutError, etcd_exc.ConnectionTimeoutError,
                                 requests.Timeout)) for link in _chain(exc))


def error_text(detail: str) -> str:
    """The ``error`` field of an etcd JSON error body, else the body."""
    try:
        return str(json.loads(detail).get("error") or detail)
    except (ValueError, AttributeError):
        return detail


def _classify_os_error(err: OSError, timeout: float) -> tuple[str, str]:
    if isinstance(err, socket.gaierror):
        return f"host name not resolved ({err.strerror or err})", "dns"
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS certificate not trusted "
                f"({err.verify_message or err.reason})"), "tls"
    if isinstance(err, ssl.SSLError):
        return f"TLS failed ({err.reason or err})", "tls"
    if isinstance(err, TimeoutError):
        return f"timed out after {timeout:g}s", "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused", "refused"
    if isinstance(err, ConnectionResetError):
        return "connection reset by the server", "other"
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:], "other"


def why(exc: BaseException, timeout: float) -> tuple[str, str]:
    """``(reason, kind)`` for a failed etcd call: the reason is short and
    never empty; the kind picks the hint."""
    err = _os_error(exc)
    if err is not None:
        return _classify_os_error(err, timeout)
    if _timed_out(exc):
        return f"timed out after {timeout:g}s", "timeout"
    if isinstance(exc, etcd_exc.Etcd3Exception):
        status = " ".join(str(a) for a in exc.args if a)
        text = error_text(exc.detail_text or "").strip()
        if status and text and text != status:
            return f"{text} (HTTP {status})", "http"
        if status or text:
            return f"HTTP {status or text}", "http"
    text = str(exc) or getattr(exc, "detail_text", None) \
        or type(exc).__name__
    return text, "other"


def hint(kinds: Sequence[str], timeout: float) -> str:
    """What to check for these kinds of failure, then the settings."""
    checks = []
    for kind in kinds:
        text = _HINTS.get(kind, _HINTS["other"])
        if text not in checks:
            checks.append(text)
    return (f"{' '.join(checks)} Settings: ares_etcd_endpoints (where "
            "etcd listens), ares_etcd_timeout (how long to wait for each "
            f"answer, now {timeout:g}s)")


def unreachable_message(failures: Sequence[Failure], timeout: float,
                        what: str = "etcd unreachable") -> str:
    """``etcd unreachable at A (reason). <hint>`` for one endpoint, each
    endpoint with its own reason for several."""
    if len(failures) == 1:
        where = f"{what} at {failures[0].address} ({failures[0].reason})"
    else:
        where = f"{what} at every endpoint: " + "; ".join(
            f"{f.address} ({f.reason})" for f in failures)
    return f"{where}. {hint([f.kind for f in failures], timeout)}"
