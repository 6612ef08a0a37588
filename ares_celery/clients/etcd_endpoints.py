"""Reading ``ares_etcd_endpoints``: what a user may write, and why not.

Settings come from Python modules, environment loaders and YAML files, so
the value is whatever the user typed: ``"127.0.0.1:2379"``, a list, a
comma-separated string, or by mistake a bare port (``2379``) or a port that
cannot exist (``99999``). Each mistake is refused here, at ``Ares(app)``,
with the setting, the bad value and the accepted forms, instead of a
``TypeError`` or a connection error on the first job.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ConfigurationError

SETTING = "ares_etcd_endpoints"

#: What the error messages say the setting accepts.
ACCEPTED_FORMS = ("'host:port', 'http://host:port' or 'https://host:port', "
                  "or a list (or comma-separated string) of them")

_SCHEMES = ("http://", "https://")


def _refuse(value: Any, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"{SETTING}={value!r}: {why}; write {ACCEPTED_FORMS}")


def _entries(endpoints: Any) -> list[Any]:
    """The individual endpoints of the setting's value."""
    if isinstance(endpoints, str):
        return [e for e in endpoints.split(",") if e.strip()]
    if isinstance(endpoints, (bytes, bytearray, dict)) \
            or not isinstance(endpoints, Iterable):
        raise _refuse(endpoints, f"a {type(endpoints).__name__} is not an "
                                 "endpoint list")
    return list(endpoints)


def _port(value: Any, raw: Any, port: Any) -> int:
    if isinstance(port, str):
        if not port.strip().isdigit():
            raise _refuse(value, f"entry {raw!r} has no numeric port"
                                 if port else f"entry {raw!r} has no port")
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise _refuse(value, f"entry {raw!r} has port {port!r}, not a number")
    if not 1 <= port <= 65535:
        raise _refuse(value, f"entry {raw!r} has port {port}, outside "
                             "1..65535")
    return port


def _parse_one(value: Any, raw: Any) -> tuple[str, int]:
    if isinstance(raw, tuple) and len(raw) == 2:
        host, port = raw
        if not isinstance(host, str) or not host:
            raise _refuse(value, f"entry {raw!r} has no host")
        return host, _port(value, raw, port)
    if not isinstance(raw, str):
        raise _refuse(value, f"entry {raw!r} is a {type(raw).__name__}, "
                             "not a string")
    item = raw.strip()
    for scheme in _SCHEMES:
        if item.startswith(scheme):
            item = item[len(scheme):].rstrip("/")
    if "://" in item:
        scheme = item.split("://", 1)[0]
        raise _refuse(value, f"entry {raw!r} has scheme {scheme!r}, not "
                             "http or https")
    if "/" in item:
        raise _refuse(value, f"entry {raw!r} has a path; etcd is reached "
                             "at host:port only")
    host, sep, port = item.rpartition(":")
    if not sep:
        raise _refuse(value, f"entry {raw!r} has no port")
    host = host.strip("[]")
    if not host:
        raise _refuse(value, f"entry {raw!r} has no host")
    return host, _port(value, raw, port)


def parse_endpoints(endpoints: str | Iterable[str]) -> list[tuple[str, int]]:
    """``["host:port", "https://host:port", ...]`` (or one comma-separated
    string) as ``(host, port)`` pairs; anything else is a
    :class:`ConfigurationError` naming the setting and the bad entry."""
    parsed = [_parse_one(endpoints, raw) for raw in _entries(endpoints)]
    if not parsed:
        raise _refuse(endpoints, "no endpoint given")
    return parsed


def endpoint_schemes(endpoints: str | Iterable[str]) -> set[str]:
    """The schemes the endpoints are written with ("http", "https"); an
    endpoint without one adds nothing (run :func:`parse_endpoints` first
    for the value to be well formed)."""
    return {str(raw).strip().split("://", 1)[0]
            for raw in _entries(endpoints)
            if not isinstance(raw, tuple) and "://" in str(raw)}
