"""Spotting ``ares_*`` names in ``app.conf`` that nothing reads.

Celery ignores settings it does not know, and so would ares: a
misspelled ``ares_lease_tll = 5`` leaves the 30 s default in force without
a word. Every ``ares_``-looking key (whatever its case, after the prefix of
``config_from_object(..., namespace=...)``) that is not a setting ares
reads is reported once, with the closest valid name.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from .errors import UnknownSettingWarning

#: ``ares_*`` names people put in ``app.conf`` that are not app settings,
#: and where that value goes instead (the warning says so).
NOT_SETTINGS: dict[str, str] = {
    "ares_mock_gpus": "the worker option --ares-mock-gpus, "
                      "`celery ares topology --mock` or the ARES_MOCK_GPUS "
                      "environment variable",
    "ares_host": "the worker option --ares-host",
}

PREFIX = "ares_"


def _namespace(conf: Any) -> str:
    """The ``namespace=`` given to ``config_from_object`` (as Celery stores
    it, e.g. ``"CELERY_"``), or ``""``."""
    prefix = getattr(conf, "prefix", None)
    return prefix if isinstance(prefix, str) else ""


def _conf_keys(conf: Any) -> Iterator[str]:
    try:
        keys = list(conf.keys())
    except (AttributeError, TypeError):
        return
    for key in keys:
        if isinstance(key, str):
            yield key


def _spellings(name: str, namespace: str) -> list[str]:
    """The keys ``conf.get(name)`` finds: ``namespace + name`` in the
    namespace's case (Celery's ``match_case``), then ``name`` itself."""
    if not namespace:
        return [name]
    spaced = namespace + name
    return [spaced.upper() if namespace.isupper() else spaced.lower(), name]


def unknown_settings(conf: Any, known: Collection[str],
                     redirects: Mapping[str, str] | None = None
                     ) -> list[tuple[str, str]]:
    """``(key, advice)`` for each ``ares_*`` key in ``conf`` that is not
    read as one of the ``known`` settings; ``redirects`` maps names that
    are not app settings at all (a worker option, say) to where that value
    goes instead."""
    namespace = _namespace(conf)
    redirects = redirects or {}
    accepted = {key for name in known for key in _spellings(name, namespace)}
    found = []
    for key in _conf_keys(conf):
        if key in accepted:
            continue
        name = key.lower()
        if namespace and name.startswith(namespace.lower()):
            name = name[len(namespace):]
        if not name.startswith(PREFIX):
            continue
        if name in redirects:
            advice = f"it is not an app setting: use {redirects[name]}"
        elif name in known:
            advice = "write it " + " or ".join(
                repr(k) for k in _spellings(name, namespace))
        else:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            advice = f"did you mean {close[0]!r}?" if close else \
                "no ares setting has a similar name"
        found.append((key, advice))
    return found


def warn_unknown_settings(conf: Any, known: Collection[str],
                          redirects: Mapping[str, str] | None = None,
                          stacklevel: int = 2) -> None:
    """Warn (:class:`~ares_celery.errors.UnknownSettingWarning`) for each
    key :func:`unknown_settings` finds; the value stays ignored."""
    for key, advice in unknown_settings(conf, known, redirects):
        warnings.warn(f"unknown setting {key!r} in app.conf is ignored; "
                      f"{advice}", UnknownSettingWarning,
                      stacklevel=stacklevel + 1)
