"""Joining a multi-process (multi-host) JAX job.

Three ways in, tried in this order:
  1. explicit: --coordinator_address=HOST:PORT --num_processes=N --process_id=I
     [--local_device_ids=0,1,...] (multi-GPU hosts, or several processes on one machine);
  2. automatic where the cluster says who is who: Cloud TPU VMs (JAX reads the VM's metadata
     server; TPU_WORKER_HOSTNAMES is only set on GKE, so a TPU VM always initializes, which is
     also right for a single-host slice), SLURM (srun), Open MPI (JAX's own cluster detection
     reads their environment);
  3. neither: a single process.
On CPU the cross-process collectives are gloo, so the same code runs multi-process on one
machine. `timeout_s` bounds how long a process waits for one that died or never came: past it,
the coordination service stops every process with an error instead of leaving them hanging.
"""
import os

import jax
from absl import logging

from nmm_jax import tpu_chips_attached


def cluster_detected() -> bool:
  """True when the environment describes a multi-process job JAX can join on its own."""
  env = os.environ
  if tpu_chips_attached() or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return True
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(coordinator_address: str = "", num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, timeout_s: int = 300):
  """Joins the job (see the module doc); a no-op for a single process. Call before any other
  JAX call."""
  explicit = bool(coordinator_address)
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if not explicit and not cluster_detected():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=timeout_s)
  if explicit:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
  jax.distributed.initialize(**kwargs)
  logging.warning("process %d of %d: %d local devices, %d in all", jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count())
