"""An exactly-once task belongs to its own app's Ares: Celery shares
``app.task`` tasks with apps created later in the process by default, and
such a copy would lock, fence and commit through the other Ares."""

from __future__ import annotations

import pytest
from celery import Celery

from ares_celery import Ares, ConfigurationError


def make(name: str) -> tuple[Celery, Ares]:
    app = Celery(name, broker="redis://127.0.0.1:1/0")
    return app, Ares(app)


def test_a_second_app_does_not_get_the_first_apps_task():
    first_app, first = make("first")

    @first.task(name="ownership.job")
    def job():
        return 1

    second_app, second = make("second")

    @second.task(name="ownership.job")
    def job_too():
        return 2

    for app, ares in ((first_app, first), (second_app, second)):
        task = app.tasks["ownership.job"]
        assert task._runtime is ares.runtime
        assert task._submitter is ares.submitter


def test_shared_true_is_refused():
    _, ares = make("sharing")
    with pytest.raises(ConfigurationError, match="shared=True"):
        ares.task(name="ownership.shared", shared=True)(lambda: None)
