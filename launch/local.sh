#!/usr/bin/env bash
# Train on this machine's devices. Usage: launch/local.sh CONFIG WORKDIR [--config.a.b=v ...]
# Running the same command again resumes from WORKDIR's latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec .venv/bin/python -m nmm_jax.train --config="$config" --workdir="$workdir" "$@"
