#!/usr/bin/env bash
# The peer benchmark from a fresh clone, in one command:
#   ./benches/run.sh --quick            # or no flag for the full sweep; --out DIR
# Makes (or reuses) the .venv of scripts/test.sh, installs the peers and this checkout's
# Panes package into it, then runs benches/harness.py with the arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r python/requirements-test.txt
# The package of this checkout (the Rust build is incremental after the first).
.venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps ./python
exec .venv/bin/python benches/harness.py "$@"
