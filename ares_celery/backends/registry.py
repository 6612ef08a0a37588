"""``ares_result_store`` names -> fenced store classes: the one row a new
store adds (see :mod:`ares_celery.backends.store` for what it must do)."""

from __future__ import annotations

from ..errors import ConfigurationError
from .etcd import FencedEtcdBackend
from .redis import FencedRedisBackend
from .store import FencedStore

STORES: dict[str, type[FencedStore]] = {
    FencedRedisBackend.store_name: FencedRedisBackend,
    FencedEtcdBackend.store_name: FencedEtcdBackend,
}


def store_class(name: str) -> type[FencedStore]:
    """The store ``ares_result_store = name`` selects."""
    try:
        return STORES[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(n) for n in sorted(STORES))
        raise ConfigurationError(
            f"ares_result_store must be one of {known}, got {name!r}") from None
