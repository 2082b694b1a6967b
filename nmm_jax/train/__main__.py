r"""Train an NMM.

  python -m nmm_jax.train --config=configs/default.py --workdir=runs/default \
      [--config.train.steps=100 ...]
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, data.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Orbax and JAX log every save at INFO; the progress bar and step lines are the useful output.
  logging.set_verbosity(logging.WARNING)
  from nmm_jax.config import ConfigError
  from nmm_jax.train.loop import train_and_evaluate
  os.makedirs(_WORKDIR.value, exist_ok=True)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    sys.exit(f"Config error: {e}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
