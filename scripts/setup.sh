#!/usr/bin/env bash
# Creates .venv (if missing) and installs nmm_jax with its test extra from setup.cfg.
# Idempotent: a second run only re-checks the installed requirements.
# EXTRAS picks other extras, e.g. EXTRAS=tpu on TPU VMs, EXTRAS=gpu on CUDA hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS:-test}]"
