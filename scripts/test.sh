#!/usr/bin/env bash
# Set up everything and run the whole suite: lint, unit, integration and
# fault tests against real redis-server/etcd processes the tests start.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check ares_celery tests benchmarks examples
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
