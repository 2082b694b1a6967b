"""The launchers' --dry-run prints exactly the commands they would run."""
import os
import shlex
import subprocess

import pytest

from conftest import tiny_config

ROOT = os.path.join(os.path.dirname(__file__), "..")


def dry_run(script, *args, env=None):
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       env={**os.environ, **(env or {})})
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def test_gpu_starts_one_process_per_gpu():
  lines = dry_run("gpu.sh", "--gpus=4", "--port=23456", "configs/default.py", "runs/g",
                  "--config.train.steps=7")
  assert len(lines) == 4
  for i, argv in enumerate(lines):
    assert argv[:3] == [".venv/bin/python", "-m", "nmm_jax.train"]
    assert argv[3:] == ["--config=configs/default.py", "--workdir=runs/g",
                        "--coordinator_address=localhost:23456", "--num_processes=4",
                        f"--process_id={i}", f"--local_device_ids={i}", "--config.train.steps=7"]


def test_slurm_runs_one_task_per_gpu_with_the_first_node_as_coordinator():
  [argv] = dry_run("slurm.sbatch", "configs/default.py", "/shared/run", "--config.mesh.fsdp=8",
                   env={"NMM_COORDINATOR_PORT": "4321"})
  assert argv[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
  task = argv[4]
  assert (".venv/bin/python -m nmm_jax.train --config=configs/default.py "
          "--workdir=/shared/run") in task
  for part in ("--coordinator_address=$FIRST_NODE:4321", "--num_processes=${SLURM_NTASKS}",
               "--process_id=${SLURM_PROCID}", "--local_device_ids=${SLURM_LOCALID}",
               "--config.mesh.fsdp=8"):
    assert part in task, part


def test_slurm_one_task_per_node_drives_all_its_gpus():
  """sbatch --ntasks-per-node=1 (what tensor parallelism over a node's GPUs needs): no local
  device ids, so each process takes every GPU of its node."""
  [argv] = dry_run("slurm.sbatch", "configs/default.py", "/shared/run", "--config.mesh.tensor=8",
                   env={"SLURM_NTASKS_PER_NODE": "1"})
  assert "--local_device_ids" not in argv[4]
  assert "--process_id=${SLURM_PROCID} --config.mesh.tensor=8" in argv[4]
  [argv] = dry_run("slurm.sbatch", "configs/default.py", "/shared/run",
                   env={"SLURM_NTASKS_PER_NODE": "8"})
  assert "--local_device_ids=${SLURM_LOCALID}" in argv[4]


def test_slurm_tasks_see_their_node_s_gpus():
  """--local_device_ids=$SLURM_LOCALID needs every GPU of the node visible to every task."""
  with open(os.path.join(ROOT, "launch", "slurm.sbatch")) as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  assert "--gpus-per-node=8" in directives and "--gpu-bind=none" in directives
  assert not any(d.startswith("--gpus-per-task") for d in directives)


def test_tensor_parallelism_across_processes_is_refused():
  from nmm_jax.config import ConfigError, validate
  with pytest.raises(ConfigError, match="mesh.tensor.*one process per GPU"):
    validate(tiny_config(**{"mesh.data": 4, "mesh.tensor": 2}), 8, num_processes=8)
  validate(tiny_config(**{"mesh.data": 4, "mesh.tensor": 2}), 8, num_processes=4)


def test_tpu_pod_creates_copies_installs_and_runs_on_every_worker():
  lines = dry_run("tpu_pod.sh", "--name=pod", "--zone=us-east5-a", "--type=v5litepod-32",
                  "configs/default.py", "/mnt/shared/run", "--config.train.steps=9")
  assert lines[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-east5-a",
                      "--accelerator-type=v5litepod-32", "--version=v2-alpha-tpuv5-lite"]
  assert lines[1][:2] == ["git", "archive"]
  assert lines[2][4:6] == ["scp", lines[1][-2]] and "--worker=all" in lines[2]
  install, train = lines[3], lines[4]
  for argv in (install, train):
    assert argv[4:7] == ["ssh", "pod", "--worker=all"]
  assert "EXTRAS=tpu bash scripts/setup.sh" in install[-1]
  assert train[-1] == ("--command=cd nmm_jax && mkdir -p logs && nohup .venv/bin/python -m "
                       "nmm_jax.train --config=configs/default.py --workdir=/mnt/shared/run "
                       "--config.train.steps=9 > logs/train-$(hostname).log 2>&1 < /dev/null &")


@pytest.mark.parametrize("script,args", [("gpu.sh", ["--gpus=2"]), ("tpu_pod.sh", ["--name=x"])])
def test_missing_arguments_are_refused(script, args):
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
  assert out.returncode != 0 and "usage" in out.stderr


def test_cluster_detection_and_explicit_flags(monkeypatch):
  from nmm_jax import distributed
  for key in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(key, raising=False)
  assert not distributed.cluster_detected()
  distributed.initialize()  # a single process: nothing to join
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1")
  assert not distributed.cluster_detected()  # one worker
  # A Cloud TPU VM has no TPU_WORKER_HOSTNAMES (that is GKE's): its attached chips say it is
  # one, and JAX finds the other workers from the VM metadata.
  monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: True)
  assert distributed.cluster_detected()
  monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert distributed.cluster_detected()
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert distributed.cluster_detected()
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    distributed.initialize("localhost:1234")
