#!/bin/sh
# Regenerates the hashed lock files the images install with `pip install --require-hashes`:
#   requirements.lock           the poller image (pyproject.toml's dependencies)
#   requirements-operator.lock  the operator image (those plus the `operator` extra)
#   requirements-build.lock     the wheel's build backend (tools/requirements-build.in)
# Needs pip-tools (pip install pip-tools). Pins already in a lock file are kept unless
# upgraded: pass --upgrade (or --upgrade-package NAME) to move them.
set -eu
cd "$(dirname "$0")/.."
export CUSTOM_COMPILE_COMMAND="sh tools/lock.sh"
opts="--quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links"
pip-compile $opts "$@" -o requirements.lock pyproject.toml
pip-compile $opts "$@" --extra operator -o requirements-operator.lock pyproject.toml
pip-compile $opts "$@" -o requirements-build.lock tools/requirements-build.in
