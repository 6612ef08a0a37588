#!/usr/bin/env bash
# Set up everything and run the demo: private Redis + etcd, a worker with a
# mock GPU topology, duplicate submissions of one request id, the single
# execution with its fencing token, and a GPU placement.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m examples.demo "$@"
