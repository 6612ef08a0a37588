"""Periodic exactly-once: one run per schedule slot, however many beats.

``celery beat`` submits a periodic task with no request id, so two beat
instances (common by accident during a deploy) run it twice per period;
and a fixed ``request_id`` in a schedule entry names one job forever, so
the task runs once and every later run is silently deduped. The cure is a
request id that names the *slot*: the period (or crontab instant) the run
belongs to, computed from the wall clock alone, so every beat instance
derives the same id for the same slot whenever it started.

- Interval schedules (a number, a ``timedelta`` or ``schedule(...)``):
  slots are aligned to the Unix epoch, ``floor(now / period) * period``
  (a daily interval starts at 00:00 UTC). :class:`ExactlyOnceScheduler`
  also fires such entries at those boundaries, not relative to its own
  start, so one beat never lands twice in a slot or skips one.
- ``crontab`` schedules: the slot is the most recent crontab instant at or
  before now, in the crontab's time zone (the app's ``timezone``).

Use the scheduler (``celery -A proj beat -S
ares_celery.exactly_once.beat:ExactlyOnceScheduler``, or
``beat_scheduler`` in the app's conf), or, with another scheduler
(django-celery-beat, RedBeat), call :func:`slot_request_id` yourself.
"""

from __future__ import annotations

import heapq
import string
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from celery.beat import PersistentScheduler, ScheduleEntry
from celery.schedules import BaseSchedule, crontab, schedstate
from celery.schedules import schedule as interval
from celery.utils.imports import load_extension_class_names, symbol_by_name

from ..errors import ConfigurationError
from .task import ExactlyOnceTask

__all__ = ["SCHEDULER_PATH", "ExactlyOnceScheduler", "check_beat_schedule",
           "check_request_id_template", "slot_request_id", "slot_start"]

#: What to give ``celery beat -S`` (or the ``beat_scheduler`` setting).
SCHEDULER_PATH = "ares_celery.exactly_once.beat:ExactlyOnceScheduler"

#: The one placeholder a schedule entry's ``request_id`` template may use.
SLOT_FIELD = "slot"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
#: How far back a crontab's latest instant is looked for: 28 years covers
#: every calendar (a Feb 29 that falls on a given weekday included).
_CRONTAB_LOOKBACK_DAYS = 28 * 366


def slot_start(schedule: BaseSchedule | timedelta | float,
               now: datetime | None = None) -> datetime:
    """The start (UTC) of the slot of ``schedule`` that ``now`` falls in.

    ``now`` defaults to the schedule's own clock; a naive ``now`` is UTC,
    as Celery takes it. Raises :class:`ConfigurationError` for schedules
    with no wall-clock slot (``solar``, zero periods, impossible crontabs).
    """
    if isinstance(schedule, (int, float, timedelta)) \
            and not isinstance(schedule, bool):
        schedule = interval(schedule)
    if isinstance(schedule, crontab):
        return _crontab_slot(schedule, _utc(now or schedule.now()))
    if isinstance(schedule, interval):
        return _interval_slot(schedule.run_every, _utc(now or schedule.now()))
    raise ConfigurationError(
        f"cannot derive a schedule slot from {schedule!r}: only intervals "
        "(number, timedelta, celery.schedules.schedule) and crontab have "
        "slots that every beat instance computes alike")


def slot_request_id(name: str, schedule: BaseSchedule | timedelta | float,
                    now: datetime | None = None,
                    template: str | None = None) -> str:
    """The request id of the run of entry ``name`` due at ``now``.

    ``beat:<name>:<slot>`` by default, the slot in ISO 8601 UTC
    (``beat:report:2024-05-01T03:00:00Z``); or ``template`` with its
    ``{slot}`` filled in. For schedulers other than
    :class:`ExactlyOnceScheduler`: pass the result as ``request_id=``.
    """
    slot = _iso(slot_start(schedule, now))
    if template is None:
        return f"beat:{name}:{slot}"
    check_request_id_template(name, template)
    return template.format(slot=slot)


def check_request_id_template(name: str, template: Any) -> None:
    """Refuse a schedule entry's ``request_id`` unless it is a template
    naming the slot: a fixed id would run the task once, ever, and
    dedup every later run."""
    fix = (f"put {{{SLOT_FIELD}}} in it (request_id=\"{name}-{{slot}}\") "
           f"and run beat with -S {SCHEDULER_PATH}, or leave request_id out "
           "and that scheduler derives one per slot")
    if not isinstance(template, str):
        raise ConfigurationError(
            f"beat_schedule entry {name!r}: request_id must be a str "
            f"template, got {type(template).__name__}; {fix}")
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template)
                  if field is not None}
    except ValueError as exc:
        raise ConfigurationError(
            f"beat_schedule entry {name!r}: request_id {template!r} is not "
            f"a valid template ({exc}); write literal braces as {{{{ }}}}"
        ) from exc
    if SLOT_FIELD not in fields:
        raise ConfigurationError(
            f"beat_schedule entry {name!r} has the fixed request_id "
            f"{template!r}: every run would reuse it, so the task would run "
            f"once and every later run would be deduped; {fix}")
    unknown = sorted(fields - {SLOT_FIELD})
    if unknown:
        raise ConfigurationError(
            f"beat_schedule entry {name!r}: request_id {template!r} uses "
            f"{unknown}; only {{{SLOT_FIELD}}} is filled in")
    try:
        template.format(slot="2000-01-01T00:00:00Z")
    except (ValueError, LookupError, AttributeError) as exc:
        raise ConfigurationError(
            f"beat_schedule entry {name!r}: request_id {template!r} cannot "
            f"be filled in ({exc}); write it as \"...{{{SLOT_FIELD}}}...\""
        ) from exc


def check_beat_schedule(conf: Mapping[str, Any],
                        scheduler: str | type | None = None) -> None:
    """Refuse ``beat_schedule`` entries whose ``request_id`` would run
    their task once ever: a fixed id (any task), or, when ``scheduler``
    (the beat's scheduler class or its ``-S`` name) is given and does not
    fill in slots, any ``request_id`` at all, since a plain Celery
    scheduler sends ``{slot}`` literally."""
    fills_slots = scheduler is None or _fills_slots(scheduler)
    for name, entry in (conf.get("beat_schedule") or {}).items():
        options = (entry.options if isinstance(entry, ScheduleEntry)
                   else entry.get("options")) or {}
        if options.get("request_id") is None:
            continue
        check_request_id_template(name, options["request_id"])
        if not fills_slots:
            raise ConfigurationError(
                f"beat_schedule entry {name!r} has request_id "
                f"{options['request_id']!r}, but the beat scheduler "
                f"{scheduler!r} does not fill in {{{SLOT_FIELD}}}: every run "
                f"would reuse the template itself; run beat with -S "
                f"{SCHEDULER_PATH}")


class ExactlyOnceScheduler(PersistentScheduler):
    """Celery's default (shelve) scheduler, one run per slot.

    Every due entry whose task is an exactly-once task, or whose options
    give a ``request_id`` template, is sent with the request id of its
    slot (:func:`slot_request_id`), so any number of beat instances run
    it once per slot. Refuses at start-up (:class:`ConfigurationError`)
    fixed request ids, templates on plain Celery tasks (where the id
    would be ignored) and schedules without a wall-clock slot.
    """

    def setup_schedule(self) -> None:
        check_beat_schedule(self.app.conf)
        super().setup_schedule()
        try:
            for entry in self.schedule.values():
                self._check_entry(entry)
        except BaseException:
            self.close()
            raise

    def populate_heap(self, *args: Any, **kwargs: Any) -> None:
        """Celery's heap, with slotted intervals placed by :meth:`is_due`
        (Celery puts them a period after this beat's last send, which
        would make their first run late in its slot)."""
        super().populate_heap(*args, **kwargs)
        for at, event in enumerate(self._heap):
            if self._aligned(event.entry):
                due, upcoming = self.is_due(event.entry)
                self._heap[at] = event._replace(time=self._when(
                    event.entry, 0 if due else upcoming))
        heapq.heapify(self._heap)

    def is_due(self, entry: ScheduleEntry) -> schedstate:
        """Slotted intervals are due on each epoch-aligned boundary (not
        a period after this beat last sent), so every beat fires in the
        same slots."""
        if not self._aligned(entry):
            return super().is_due(entry)
        now = _utc(entry.schedule.now())
        current = _interval_slot(entry.schedule.run_every, now)
        last = _interval_slot(entry.schedule.run_every,
                              _utc(entry.last_run_at))
        upcoming = current + entry.schedule.run_every - now
        return schedstate(current > last, upcoming.total_seconds())

    def apply_async(self, entry: ScheduleEntry, producer: Any = None,
                    advance: bool = True, **kwargs: Any) -> Any:
        """Celery's send, with ``request_id=`` the slot's for slotted
        entries."""
        if not self._slotted(entry):
            return super().apply_async(entry, producer, advance, **kwargs)
        # Reserve the stored entry, not the copy carrying this slot's id:
        # the schedule keeps the template for the next slot.
        entry = self.reserve(entry) if advance else entry
        request_id = slot_request_id(entry.name, entry.schedule,
                                     template=entry.options.get("request_id"))
        this_slot = type(entry)(**dict(
            entry, options={**entry.options, "request_id": request_id}))
        return super().apply_async(this_slot, producer, advance=False,
                                   **kwargs)

    def _slotted(self, entry: ScheduleEntry) -> bool:
        return (entry.options.get("request_id") is not None
                or isinstance(self.app.tasks.get(entry.task),
                              ExactlyOnceTask))

    def _aligned(self, entry: ScheduleEntry) -> bool:
        return isinstance(entry.schedule, interval) and self._slotted(entry)

    def _check_entry(self, entry: ScheduleEntry) -> None:
        if not self._slotted(entry):
            return
        task = self.app.tasks.get(entry.task)
        if task is not None and not isinstance(task, ExactlyOnceTask):
            raise ConfigurationError(
                f"beat_schedule entry {entry.name!r} gives a request_id, "
                f"but {entry.task!r} is a plain Celery task, which would "
                "ignore it; make it an @ares.task or drop request_id")
        slot_request_id(entry.name, entry.schedule,
                        template=entry.options.get("request_id"))


def _fills_slots(scheduler: str | type) -> bool:
    aliases = dict(load_extension_class_names("celery.beat_schedulers"))
    cls = symbol_by_name(scheduler, aliases=aliases)
    return isinstance(cls, type) and issubclass(cls, ExactlyOnceScheduler)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _iso(slot: datetime) -> str:
    spec = "seconds" if slot.microsecond == 0 else "microseconds"
    return slot.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _interval_slot(period: timedelta, now: datetime) -> datetime:
    """Integer microseconds throughout: float division would put an
    instant on a boundary in either slot, depending on rounding."""
    step = period // _MICROSECOND
    if step <= 0:
        raise ConfigurationError(
            f"an interval schedule of {period} has no slots; give a "
            "positive period")
    elapsed = (now - _EPOCH) // _MICROSECOND
    return _EPOCH + timedelta(microseconds=elapsed - elapsed % step)


def _crontab_slot(cron: crontab, now: datetime) -> datetime:
    """The latest instant matching ``cron`` at or before ``now``, found
    in the crontab's own time zone (its fields are wall-clock times)."""
    zone = cron.tz
    local = now.astimezone(zone)
    day, cutoff = local.date(), (local.hour, local.minute)
    times = sorted(((h, m) for h in cron.hour for m in cron.minute),
                   reverse=True)
    for _ in range(_CRONTAB_LOOKBACK_DAYS):
        if _runs_on(cron, day):
            for hour, minute in times:
                if (hour, minute) > cutoff:
                    continue
                instant = datetime.combine(day, time(hour, minute),
                                           tzinfo=zone).astimezone(timezone.utc)
                if instant <= now:  # a wall time in a DST gap may not be
                    return instant
        day -= timedelta(days=1)
        cutoff = (23, 59)
    raise ConfigurationError(
        f"{cron!r} has no instant in the last 28 years (a day that no "
        "month has?): it has no slots")


def _runs_on(cron: crontab, day: date) -> bool:
    """Celery's crontab matches a date only when month, day of month and
    day of week all match (Sunday is 0)."""
    return (day.month in cron.month_of_year and day.day in cron.day_of_month
            and day.isoweekday() % 7 in cron.day_of_week)
