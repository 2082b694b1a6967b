#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the TPU VM slice (or reuse it), copy the repository to
# every worker, install, and run the same train command on all workers at once (JAX finds the
# other workers from the TPU environment).
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--type=v5litepod-16] \
#       [--version=v2-alpha-tpuv5-lite] [--project=P] CONFIG WORKDIR [--config.a.b=v ...]
#
# WORKDIR (and data.dir) must be a folder every worker sees at the same path, e.g. a Filestore
# (NFS) or gcsfuse mount: every worker saves its shards of each checkpoint there.
# --dry-run prints every command instead of running it. The run is started with nohup on every
# worker and logs to nmm_jax/logs/train-HOSTNAME.log there.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0 name="" zone="" type=v5litepod-16 version=v2-alpha-tpuv5-lite project=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    *) echo "launch/tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
usage="usage: launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--type=T] CONFIG WORKDIR [overrides...]"
[[ -n $name && -n $zone ]] || { echo "$usage" >&2; exit 2; }
config=${1:?$usage}
workdir=${2:?$usage}
shift 2

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
archive=/tmp/nmm_jax-$name.tar.gz
train=$(printf '%q ' .venv/bin/python -m nmm_jax.train --config="$config" --workdir="$workdir" "$@")
train=${train% }

run() {  # prints the command under --dry-run, runs it otherwise
  if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ $dry_run == 1 ]] || ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version"
fi
run git archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name":nmm_jax.tar.gz --worker=all "${where[@]}"
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" \
  --command="mkdir -p nmm_jax && tar -xzf nmm_jax.tar.gz -C nmm_jax && cd nmm_jax && EXTRAS=tpu bash scripts/setup.sh"
# nohup: the run outlives this ssh session (a dropped connection must not kill a pod job); each
# worker logs to its own file.
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" \
  --command="cd nmm_jax && mkdir -p logs && nohup $train > logs/train-\$(hostname).log 2>&1 < /dev/null &"
echo "started; follow worker 0 with: ${tpu[*]} ssh $name ${where[*]} --worker=0 --command='tail -f nmm_jax/logs/train-*.log'"
