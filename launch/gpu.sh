#!/usr/bin/env bash
# Train on one host's GPUs, one process per GPU (JAX's multi-controller layout, as on a cluster).
#
#   launch/gpu.sh [--dry-run] [--gpus=N] [--port=P] CONFIG WORKDIR [--config.a.b=v ...]
#
# N defaults to the GPUs nvidia-smi lists. Process i drives GPU i (--local_device_ids=i) and
# joins the job through process 0 at localhost:P. SIGTERM/SIGINT are passed to every process:
# they agree on a step, save it and exit 0; the same command resumes. --dry-run prints the
# commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0 gpus="" port=12355
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --gpus=*) gpus=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    *) echo "launch/gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
usage="usage: launch/gpu.sh [--dry-run] [--gpus=N] [--port=P] CONFIG WORKDIR [overrides...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
if [[ -z $gpus ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $gpus -gt 0 ]] || { echo "launch/gpu.sh: no GPUs found; pass --gpus=N" >&2; exit 2; }
fi

commands=()
for ((i = 0; i < gpus; i++)); do
  commands+=("$(printf '%q ' .venv/bin/python -m nmm_jax.train --config="$config" \
    --workdir="$workdir" --coordinator_address=localhost:"$port" --num_processes="$gpus" \
    --process_id="$i" --local_device_ids="$i" "$@")")
done
if [[ $dry_run == 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi
pids=()
for cmd in "${commands[@]}"; do
  eval "$cmd" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
