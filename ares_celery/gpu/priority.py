"""Job priorities: the valid range, aging, and what a broker is told.

A GPU job's priority is an int from 0 (least urgent) to 9 (most urgent),
5 by default. Everything that waits is ordered by the *effective* priority:
the job's own priority plus one level for every :data:`AGING_STEP_S`
seconds it has waited since it was submitted, capped at 9. Aging is what
keeps a low-priority job from starving behind a steady stream of urgent
ones: a priority-0 job reaches 9 after ``9 * AGING_STEP_S`` (2 h 15 min)
of waiting, and from then on it is served in submission order among the
most urgent jobs, ahead of every one submitted after it. The ledger on each host and
``benchmarks/priority_simulation.py`` use this one function, so the
simulated figures describe the rule the workers apply.

Brokers order messages too, before a worker ever sees them, and they do not
agree on the direction: RabbitMQ delivers the highest ``priority`` first
(on queues declared with ``x-max-priority``), while kombu's Redis transport
serves its priority lists lowest number first. :func:`broker_priority`
translates, so "higher is more urgent" holds on both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError

MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
#: A waiting job gains one priority level per this many seconds waited.
AGING_STEP_S = 900.0

#: Priority classes used in metrics docs and the simulation's table.
CLASSES: tuple[tuple[str, range], ...] = (
    ("low", range(0, 4)), ("normal", range(4, 7)), ("high", range(7, 10)))

#: Broker URL schemes whose kombu transport serves low numbers first.
_REVERSED_SCHEMES = ("redis", "rediss", "sentinel", "redis+socket")


def validate_priority(value: Any, where: str = "priority") -> int:
    """``value`` if it is an int in 0-9; a bool is refused (``True`` is not a
    priority a person means to write)."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ConfigurationError(
            f"{where} must be an int from {MIN_PRIORITY} (least urgent) to "
            f"{MAX_PRIORITY} (most urgent), got {value!r}")
    return value


def validate_preemptible(value: Any) -> bool:
    """``preemptible`` must be a real bool: a truthy string such as
    ``"no"`` would silently make a job preemptible."""
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"preemptible must be True or False, got {value!r}")
    return value


def route_priority(route: Mapping[str, Any], default: int) -> int:
    """The priority a route header carries, ``default`` if it carries no
    valid one (a message routed by name, an older client)."""
    priority = route.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        return default
    return priority


def effective_priority(priority: int, waited_s: float,
                       step_s: float = AGING_STEP_S) -> int:
    """``priority`` aged by ``waited_s`` seconds of waiting (capped at 9)."""
    if waited_s <= 0:
        return priority
    return min(MAX_PRIORITY, priority + int(waited_s // step_s))


def priority_class(priority: int) -> str:
    """``low`` (0-3), ``normal`` (4-6) or ``high`` (7-9)."""
    for name, members in CLASSES:
        if priority in members:
            return name
    raise ConfigurationError(f"not a priority: {priority!r}")


def broker_priority(priority: int, broker_url: str | None) -> int:
    """The message ``priority`` that makes ``broker_url``'s transport serve
    more urgent jobs first (RabbitMQ: as is; Redis: reversed, 9 - p)."""
    scheme = (broker_url or "").split("://", 1)[0].lower()
    if scheme in _REVERSED_SCHEMES:
        return MAX_PRIORITY - priority
    return priority
