"""Flower integration: show the ``task-ares-*`` event fields on task pages.

Start Flower with the config file shipped here::

    celery -A proj flower --conf="$(python -m ares_celery.flower)"

or, to add your own Flower options, write your own ``flowerconfig.py``
with ``from ares_celery.flower.task_format import format_task`` in it.
"""

from pathlib import Path

#: The Flower config file to pass to ``--conf``.
CONFIG_FILE = Path(__file__).resolve().with_name("flowerconfig.py")
