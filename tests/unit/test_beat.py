"""Beat slots: the request id of a periodic run names its slot, which every
beat instance computes alike whenever it started; fixed ids are refused."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery
from celery.schedules import BaseSchedule, crontab

from ares_celery import AresError, ConfigurationError
from ares_celery.exactly_once.beat import (
    SCHEDULER_PATH,
    ExactlyOnceScheduler,
    check_beat_schedule,
    slot_request_id,
    slot_start,
)
from ares_celery.exactly_once.task import ExactlyOnceTask

UTC = timezone.utc


class EverySunset(BaseSchedule):
    """A schedule with no wall-clock slot (like ``solar``, which needs
    ``ephem``): due at moments only it knows."""

    def is_due(self, last_run_at):
        return False, 60.0

    def __reduce__(self):
        return self.__class__, ()


def at(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


# -- interval slots -----------------------------------------------------------

def test_interval_instances_in_one_slot_agree():
    """Two beats that look at different moments of one 2 s slot (one just
    after it opened, one just before it closes) derive the same id."""
    early = slot_request_id("tick", 2, at(2024, 5, 1, 12, 0, 0))
    late = slot_request_id("tick", 2, at(2024, 5, 1, 12, 0, 1) +
                           timedelta(microseconds=999_999))
    assert early == late == "beat:tick:2024-05-01T12:00:00Z"


def test_interval_consecutive_slots_differ():
    ids = [slot_request_id("tick", 2, at(2024, 5, 1, 12, 0, s))
           for s in range(0, 10, 2)]
    assert len(set(ids)) == 5
    assert ids[1] == "beat:tick:2024-05-01T12:00:02Z"


def test_interval_slots_are_aligned_to_the_epoch():
    """A daily interval's slot starts at 00:00 UTC whatever time it is
    now; a 90 s interval's at a multiple of 90 s since 1970."""
    assert slot_start(timedelta(days=1), at(2024, 5, 1, 17, 45)) == \
        at(2024, 5, 1)
    start = slot_start(90, at(2024, 5, 1, 12, 0, 59))
    assert (start - at(1970, 1, 1)).total_seconds() % 90 == 0
    assert start <= at(2024, 5, 1, 12, 0, 59) < start + timedelta(seconds=90)


def test_fractional_periods_keep_their_microseconds():
    now = at(2024, 5, 1, 12, 0, 1) + timedelta(microseconds=600_000)
    assert slot_request_id("t", 1.5, now) == "beat:t:2024-05-01T12:00:01.500000Z"


def test_naive_now_is_utc_and_other_zones_are_converted():
    naive = datetime(2024, 5, 1, 12, 0, 1)
    berlin = at(2024, 5, 1, 12, 0, 1).astimezone(
        timezone(timedelta(hours=2)))
    assert slot_start(2, naive) == slot_start(2, berlin) == \
        at(2024, 5, 1, 12, 0, 0)


def test_zero_period_and_unknown_schedules_have_no_slots():
    with pytest.raises(ConfigurationError, match="positive period"):
        slot_start(0, at(2024, 5, 1))
    with pytest.raises(ConfigurationError, match="cannot derive"):
        slot_start(EverySunset(), at(2024, 5, 1))


# -- crontab slots ------------------------------------------------------------

def bound(cron: crontab, zone: str = "UTC") -> crontab:
    app = Celery("cron", set_as_current=False)
    app.conf.timezone = zone
    cron.app = app
    return cron


def test_crontab_slot_is_the_latest_instant_at_or_before_now():
    quarter = bound(crontab(minute="*/15"))
    assert slot_start(quarter, at(2024, 5, 1, 12, 7, 30)) == \
        at(2024, 5, 1, 12, 0)
    assert slot_start(quarter, at(2024, 5, 1, 12, 14, 59)) == \
        at(2024, 5, 1, 12, 0)
    assert slot_start(quarter, at(2024, 5, 1, 12, 15)) == \
        at(2024, 5, 1, 12, 15)
    nightly = bound(crontab(minute=0, hour=3))
    assert slot_start(nightly, at(2024, 5, 1, 2, 0)) == at(2024, 4, 30, 3, 0)
    monday = bound(crontab(minute=0, hour=0, day_of_week="mon"))
    assert slot_start(monday, at(2024, 5, 1, 12)) == at(2024, 4, 29)
    the_31st = bound(crontab(minute=0, hour=0, day_of_month=31))
    assert slot_start(the_31st, at(2024, 5, 1)) == at(2024, 3, 31)


def test_crontab_instances_in_one_slot_agree_and_slots_differ():
    nightly = bound(crontab(minute=0, hour=3))
    a = slot_request_id("n", nightly, at(2024, 5, 1, 3, 0, 0, 5000))
    b = slot_request_id("n", nightly, at(2024, 5, 1, 23, 59, 59))
    c = slot_request_id("n", nightly, at(2024, 5, 2, 3, 0, 1))
    assert a == b == "beat:n:2024-05-01T03:00:00Z"
    assert c == "beat:n:2024-05-02T03:00:00Z"


def test_crontab_is_read_in_the_app_time_zone():
    """03:00 in Berlin is 01:00 UTC in summer and 02:00 UTC in winter."""
    nightly = bound(crontab(minute=0, hour=3), "Europe/Berlin")
    assert slot_start(nightly, at(2024, 7, 1, 12)) == at(2024, 7, 1, 1)
    assert slot_start(nightly, at(2024, 1, 10, 12)) == at(2024, 1, 10, 2)


@pytest.mark.parametrize("spec", [
    dict(minute="*/7"),
    dict(minute="5,50", hour="*/5"),
    dict(minute=30, hour=2, day_of_week="sat,sun"),
    dict(minute=0, hour=0, day_of_month="1,15", month_of_year="*/4"),
    dict(minute=0, hour=12, day_of_month=29, month_of_year=2),
])
@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_crontab_slot_agrees_with_celerys_own_next_run(spec, zone):
    """Celery's crontab is the oracle: the slot is at or before now, and
    the next run Celery computes after the slot is after now (so no
    instant was skipped in between)."""
    rng = random.Random(f"{spec}{zone}")
    for _ in range(40):
        now = at(2023, 1, 1) + timedelta(seconds=rng.randrange(4 * 365 * 86400))
        cron = bound(crontab(**spec), zone)
        cron.nowfun = lambda now=now: now
        start = slot_start(cron, now)
        assert start <= now
        last, delta, _ = cron.remaining_delta(start)
        assert last + delta > now, (spec, zone, now, start)


def test_impossible_crontab_has_no_slot():
    never = bound(crontab(minute=0, hour=0))
    # Celery refuses Feb 30 when the crontab is built; a field set later
    # (a hand-edited entry, say) is caught here rather than looping.
    never.day_of_month, never.month_of_year = {30}, {2}
    with pytest.raises(ConfigurationError, match="no instant"):
        slot_start(never, at(2024, 5, 1))


# -- templates and fixed ids --------------------------------------------------

def test_template_gets_the_slot():
    assert slot_request_id("report", 60, at(2024, 5, 1, 12, 0, 30),
                           template="nightly-{slot}") == \
        "nightly-2024-05-01T12:00:00Z"


@pytest.mark.parametrize("template, fragment", [
    ("nightly", "fixed request_id 'nightly'"),
    ("{slot}-{run}", r"\['run'\]"),
    ("{slot}-{}", r"\[''\]"),
    ("nightly-{slot", "not a valid template"),
    (42, "must be a str"),
])
def test_bad_templates_are_refused_naming_the_entry(template, fragment):
    with pytest.raises(ConfigurationError, match=fragment) as info:
        slot_request_id("report", 60, template=template)
    assert "'report'" in str(info.value)
    assert isinstance(info.value, AresError)


def test_check_beat_schedule_refuses_a_fixed_request_id_and_names_the_fix():
    conf = {"beat_schedule": {
        "fine": {"task": "a", "schedule": 60},
        "templated": {"task": "a", "schedule": 60,
                      "options": {"request_id": "t-{slot}"}},
        "nightly": {"task": "any.task", "schedule": crontab(hour=3),
                    "options": {"request_id": "nightly-report"}},
    }}
    with pytest.raises(ConfigurationError) as info:
        check_beat_schedule(conf)
    message = str(info.value)
    assert "'nightly'" in message and "'nightly-report'" in message
    assert "{slot}" in message and SCHEDULER_PATH in message
    del conf["beat_schedule"]["nightly"]
    check_beat_schedule(conf)
    check_beat_schedule({})


def test_check_beat_schedule_refuses_templates_a_plain_scheduler_sends_as_is():
    conf = {"beat_schedule": {"t": {"task": "a", "schedule": 60,
                                    "options": {"request_id": "t-{slot}"}}}}
    with pytest.raises(ConfigurationError, match="does not fill in"):
        check_beat_schedule(conf, scheduler="celery.beat:PersistentScheduler")
    check_beat_schedule(conf, scheduler=SCHEDULER_PATH)
    check_beat_schedule(conf, scheduler=ExactlyOnceScheduler)


# -- the scheduler ------------------------------------------------------------

class Recording(ExactlyOnceTask):
    """Records what beat passes to ``apply_async`` instead of submitting
    (the submission itself is covered by tests/integration/test_beat.py)."""

    sent: list[dict] = []

    def apply_async(self, args=None, kwargs=None, task_id=None, **options):
        self.sent.append(options)


@pytest.fixture()
def beat_app():
    app = Celery("beat-unit", set_as_current=False)
    app.conf.result_backend = None

    @app.task(name="eo", base=Recording, shared=False)
    def eo():
        pass

    @app.task(name="plain", shared=False)
    def plain():
        pass

    Recording.sent = []
    return app


@pytest.fixture()
def scheduler(beat_app, tmp_path):
    """Builds an ExactlyOnceScheduler for the given entries (its shelve in
    ``tmp_path``) and closes it after the test."""
    built = []

    def build(**entries) -> ExactlyOnceScheduler:
        beat_app.conf.beat_schedule = entries
        beat = ExactlyOnceScheduler(beat_app,
                                    schedule_filename=str(tmp_path / "s"))
        built.append(beat)
        return beat
    yield build
    for beat in built:
        beat.close()


class Clock:
    """A settable ``nowfun`` (picklable, as the shelve stores schedules)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_scheduler_sends_each_slot_its_own_id_and_keeps_the_template(
        scheduler):
    beat = scheduler(default={"task": "eo", "schedule": 2},
                     templated={"task": "eo", "schedule": 2,
                                "options": {"request_id": "x-{slot}"}},
                     plain={"task": "plain", "schedule": 2})
    for _ in range(2):
        beat.apply_async(beat.schedule["default"])
        beat.apply_async(beat.schedule["templated"])
    ids = [options["request_id"] for options in Recording.sent]
    assert ids[0].startswith("beat:default:") and ids[0].endswith("Z")
    assert ids[1].startswith("x-") and "{slot}" not in ids[1]
    assert ids[2:] == ids[:2] or ids[2] > ids[0]  # same slot, or the next
    assert beat.schedule["templated"].options["request_id"] == "x-{slot}"
    assert "request_id" not in beat.schedule["default"].options


def test_scheduler_fires_intervals_on_epoch_aligned_boundaries(scheduler):
    beat = scheduler(tick={"task": "eo", "schedule": 2})
    entry = beat.schedule["tick"]
    clock = entry.schedule.nowfun = Clock(at(2024, 5, 1, 12, 0, 1, 500_000))
    entry.last_run_at = at(2024, 5, 1, 12, 0, 1)     # this beat started here
    due, upcoming = beat.is_due(entry)
    assert (due, upcoming) == (False, 0.5)            # not start + 2 s
    clock.now = at(2024, 5, 1, 12, 0, 2, 100_000)
    due, upcoming = beat.is_due(entry)
    assert due and upcoming == pytest.approx(1.9)


def test_first_run_is_placed_on_the_boundary_too(scheduler):
    """Celery's heap puts an interval a period after the last send; ours
    puts a slotted one at the next boundary, so its first run is not late
    in its slot."""
    beat = scheduler(tick={"task": "eo", "schedule": 2},
                     plain={"task": "plain", "schedule": 2})
    for entry in beat.schedule.values():
        entry.schedule.nowfun = Clock(at(2024, 5, 1, 12, 0, 1, 500_000))
        entry.last_run_at = at(2024, 5, 1, 12, 0, 1)
    beat.populate_heap()
    when = {event.entry.name: event.time for event in beat._heap}
    assert when["tick"] == pytest.approx(at(2024, 5, 1, 12, 0, 2).timestamp(),
                                         abs=0.02)
    assert when["plain"] == pytest.approx(
        at(2024, 5, 1, 12, 0, 3).timestamp(), abs=0.02)


@pytest.mark.parametrize("entry, fragment", [
    ({"task": "eo", "schedule": 60, "options": {"request_id": "fixed"}},
     "fixed request_id"),
    ({"task": "plain", "schedule": 60, "options": {"request_id": "p-{slot}"}},
     "plain Celery task"),
    ({"task": "eo", "schedule": EverySunset()},
     "cannot derive"),
])
def test_scheduler_refuses_at_setup(scheduler, entry, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        scheduler(bad=entry)


def test_plain_task_entries_keep_celerys_timing(scheduler):
    """Entries without exactly-once tasks are Celery's: due a period after
    their last run, not on an epoch boundary, and sent with no id."""
    beat = scheduler(plain={"task": "plain", "schedule": 2})
    entry = beat.schedule["plain"]
    entry.schedule.nowfun = Clock(at(2024, 5, 1, 12, 0, 2, 100_000))
    entry.last_run_at = at(2024, 5, 1, 12, 0, 1)
    due, upcoming = beat.is_due(entry)
    assert not due and upcoming == pytest.approx(0.9)


def test_ares_refuses_a_fixed_request_id_in_the_beat_schedule():
    """Wired into Ares: a schedule entry with a fixed request id would run
    once ever and then be silently deduped, so the app refuses it."""
    from ares_celery import Ares

    app = Celery("fixed", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.beat_schedule = {"nightly": {
        "task": "shop.report", "schedule": 60.0,
        "options": {"request_id": "nightly-report"}}}
    with pytest.raises(ConfigurationError, match="nightly"):
        Ares(app)
