"""Flower config file for ares-celery workers.

Flower executes this file (``--conf``) and takes every global that names
one of its options. ``format_task`` lists the ``ares_*`` fields of our
``task-ares-*`` events among the task's details.
"""

from ares_celery.flower.task_format import format_task  # noqa: F401
