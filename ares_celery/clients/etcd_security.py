"""How the gateway reaches a secured etcd: TLS files and user auth.

etcd's JSON gateway authenticates with a token: ``POST /v3/auth/authenticate``
with a user and password returns one, and every later request carries it in
the ``Authorization`` header. Authenticating is a Raft write on the server,
so the token is fetched once per gateway (one per process) and shared by
its threads, and fetched again only when etcd says it is no longer valid
(simple tokens expire after ``--auth-token-ttl`` idle seconds and die with
an ``auth disable``; JWTs expire on their own).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Fragments of etcd errors that mean "authenticate (again)", as opposed
#: to "this user may not do that" (which a new token would not fix).
_TOKEN_REJECTED = ("invalid auth token", "user name is empty",
                   "auth token is not provided")


@dataclass(frozen=True)
class EtcdSecurity:
    """TLS and credentials for etcd; the default is plain http, no auth."""

    protocol: str = "http"
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.protocol == "https"


def token_rejected(detail: str) -> bool:
    """Whether an etcd error body says the request lacked a valid token."""
    return any(fragment in detail for fragment in _TOKEN_REJECTED)


class TokenCache:
    """The current auth token of one gateway, refreshed on rejection.

    ``authenticate`` is the gateway's own POST (with its endpoint fail-over)
    to ``/auth/authenticate``; this class only decides when to call it and
    keeps concurrent threads from stampeding etcd with logins: a thread that
    finds the token already replaced since it failed just uses the new one.
    """

    def __init__(self, security: EtcdSecurity,
                 authenticate: Callable[[dict[str, Any]], dict[str, Any]],
                 ) -> None:
        self._security = security
        self._authenticate = authenticate
        self._token: str | None = None
        self._lock = threading.Lock()
        #: How many times this process logged in (tests assert it stays 1).
        self.logins = 0

    @property
    def enabled(self) -> bool:
        return self._security.user is not None

    def current(self) -> str | None:
        """The token to send now (logging in first if there is none)."""
        if not self.enabled:
            return None
        token = self._token
        return token if token is not None else self.refresh(None)

    def refresh(self, rejected: str | None) -> str:
        """A new token, unless another thread already replaced ``rejected``.

        An empty token means the cluster has auth disabled: requests go
        without one, and the first "user name is empty" after an operator
        enables auth logs in for real.
        """
        with self._lock:
            if self._token is not None and self._token != rejected:
                return self._token
            resp = self._authenticate({"name": self._security.user,
                                       "password": self._security.password})
            self._token = resp.get("token") or ""
            self.logins += 1
            return self._token

    def header(self) -> dict[str, str]:
        token = self.current()
        return {"Authorization": token} if token else {}
