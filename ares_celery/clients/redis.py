"""Redis connections for the dedup store and the fenced result backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis

from ..errors import AuthenticationFailed, ServiceUnavailable


def redact_url(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def connect(url: str, max_connections: int = 16,
            socket_timeout: float = 5.0) -> redis.Redis:
    """A client with a deliberately small, *blocking* pool.

    redis-py 8 defaults to 100 connections per pool; a prefork worker has one
    pool per child, so the default multiplies quickly. A blocking pool makes
    a burst of client threads queue for a connection instead of failing with
    "Too many connections". The pool re-creates its connections after
    ``fork`` by itself (it checks the pid).
    """
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=socket_timeout,
        socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
        health_check_interval=30)
    return redis.Redis(connection_pool=pool)


@contextmanager
def unavailable_as_ares_error(url: str) -> Iterator[None]:
    """Turn redis connection failures into :class:`ServiceUnavailable`
    (:class:`AuthenticationFailed` for a missing or wrong password)."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise AuthenticationFailed(
            f"Redis at {redact_url(url)} refused the connection: {exc} "
            "(check the user and password in the redis:// URL)") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailable(
            f"Redis unreachable at {redact_url(url)}: {exc}") from exc
