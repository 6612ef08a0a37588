import uuid

import pytest

from ares_celery import AresError, InvalidRequestId
from ares_celery.exactly_once.identity import (
    job_id_for,
    submission_digest,
    validate_request_id,
)


def test_job_id_is_deterministic_and_namespaced():
    a = job_id_for("ares", "order-77")
    assert a == job_id_for("ares", "order-77")
    assert uuid.UUID(a).version == 5
    assert a != job_id_for("ares", "order-78")
    assert a != job_id_for("other", "order-77")


@pytest.mark.parametrize("bad, fragment", [
    ("", "empty"),
    ("   ", "empty"),
    (None, "must be a str"),
    (42, "must be a str"),
    (b"bytes", "must be a str"),
    ("x" * 257, "257 characters"),
    ("a\nb", "control"),
])
def test_bad_request_ids_are_rejected_clearly(bad, fragment):
    with pytest.raises(InvalidRequestId, match=fragment) as info:
        validate_request_id(bad)
    assert isinstance(info.value, AresError)


def test_longest_allowed_request_id():
    assert validate_request_id("x" * 256) == "x" * 256


def test_digest_separates_tasks_and_arguments():
    base = submission_digest("t", ("a", 5), {})
    assert base == submission_digest("t", ["a", 5], None)
    assert base != submission_digest("t", ("a", 6), {})
    assert base != submission_digest("u", ("a", 5), {})
