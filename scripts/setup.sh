#!/usr/bin/env bash
# Set up a virtual environment in .venv with milliwatt and everything it needs, offline models included.
# Idempotent: a second run only checks. Needs Python 3.11+, a C/C++ compiler and cmake
# (llama-cpp-python builds from source the first time, about 13 minutes on 2 cores; pip caches the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "milliwatt needs Python 3.11 or newer")'

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi

# Without torch installed first, pip would pick a CUDA build of several GB for sentence-transformers.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi

# Every extra (README, "Install"): the tiers, `milliwatt serve`, the HTML report; and the tests'.
.venv/bin/python -m pip install --quiet -e ".[all,test]"

# The HTML report's test renders the page in a real headless browser: Debian's chromium.
# Installed only where we can (root, apt-get); elsewhere that test says it skipped and why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "could not install chromium; the browser test will skip" >&2
fi
# The ledger's PostgreSQL tests start a throwaway cluster with Debian's postgresql (initdb, pg_ctl).
# Installed only where we can (root, apt-get); elsewhere those tests say they skipped and why.
if ! command -v pg_ctl >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 &&
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } ||
    echo "could not install postgresql; the ledger's PostgreSQL tests will skip" >&2
fi
echo "milliwatt is set up in .venv"
