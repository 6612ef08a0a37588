"""Submission runs its stages in order: validate -> reserve (dedup) ->
route -> publish -> mark published. Routing is asked only when this call
must publish, and a routing failure gives the reservation back."""

from __future__ import annotations

import pytest

from ares_celery import AresError
from ares_celery.keys import Keys

pytestmark = pytest.mark.integration


class Route:
    """A route stage that counts its calls and may fail."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, options):
        self.calls += 1
        if self.fail:
            raise AresError("no host can take it now")
        return dict(options, queue="celery")


def submit(jobs, request_id, route, value="x"):
    return jobs.ares.submitter.submit(jobs.record, (value,), None, None,
                                      request_id, {}, route=route)


def test_duplicates_are_not_routed(jobs, store, broker):
    route = Route()
    first = submit(jobs, "order-dup", route)
    for _ in range(3):
        assert submit(jobs, "order-dup", route).id == first.id
    assert route.calls == 1          # the duplicates never asked the router
    assert broker.queue_length("celery") == 1


def test_a_routing_failure_rolls_the_reservation_back(jobs, store, broker):
    keys = Keys(jobs.ares.settings.namespace)
    with pytest.raises(AresError, match="no host can take it now"):
        submit(jobs, "order-fail", Route(fail=True))
    assert not store.exists(keys.dedup("order-fail"))
    assert broker.queue_length("celery") == 0
    # The retry is not blocked by a stale claim: it routes and publishes.
    route = Route()
    result = submit(jobs, "order-fail", route)
    assert route.calls == 1 and broker.queue_length("celery") == 1
    assert jobs.ares.services.dedup.flush_marks()
    assert store.hget(keys.dedup("order-fail"), "state") == b"published"
    assert result.id == submit(jobs, "order-fail", route).id
