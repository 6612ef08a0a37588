#!/usr/bin/env bash
# Install what ares-celery needs on a fresh Debian machine: the real Redis
# and etcd servers the demo and the tests start, and a virtualenv with the
# package and its dev extras. Safe to run again (it skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# RabbitMQ, the other first-class broker: tests start private nodes of it.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
# Headless browser for the Flower UI test (Playwright drives Debian's
# chromium; it never downloads a browser of its own).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
if ((${#need_apt[@]})); then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "bootstrap: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # Debian starts packaged services where it can; we never use them.
  $SUDO systemctl disable --now etcd redis-server rabbitmq-server \
    >/dev/null 2>&1 || true
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import ares_celery, celery, etcd3gw, pynvml, networkx" \
  || { echo "bootstrap: install failed" >&2; exit 1; }
echo "bootstrap: ready (redis-server $(redis-server --version | awk '{print $3}'), $(etcd --version | head -1), rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?'))"
