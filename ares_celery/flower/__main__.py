"""``python -m ares_celery.flower`` prints the path of the Flower config
file, for ``celery flower --conf="$(python -m ares_celery.flower)"``."""

from . import CONFIG_FILE

print(CONFIG_FILE)
