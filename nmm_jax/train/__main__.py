r"""Train an NMM.

  python -m nmm_jax.train --config=configs/default.py --workdir=runs/default \
      [--config.train.steps=100 ...]

Multi-process: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I (each
process; on GPUs also --local_device_ids), or nothing on a TPU pod slice or under SLURM, where
the job is found from the environment (nmm_jax/distributed.py, launch/).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, data.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0, for a "
                                   "multi-process job started by hand.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
_LOCAL_DEVICES = flags.DEFINE_list("local_device_ids", None, "GPU ids this process drives.")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds a process waits for the "
                                "others to start, or for a silent one, before the job stops "
                                "with an error.")


def main(argv):
  del argv
  # Orbax and JAX log every save at INFO; the progress bar and step lines are the useful output.
  logging.set_verbosity(logging.WARNING)
  from nmm_jax import distributed, xla_flags
  xla_flags.apply(_CONFIG.value.train.xla_flags)  # read once, when a JAX backend starts
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None,
                         _TIMEOUT.value)
  from nmm_jax import storage
  from nmm_jax.config import ConfigError
  from nmm_jax.train.loop import train_and_evaluate
  storage.path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    sys.exit(f"Config error: {e}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
