r"""The default job: a small early-fusion NMM on the embedded shapes data (a few minutes on CPU).

  python -m nmm_jax.train --config=configs/default.py --workdir=runs/default
"""
from nmm_jax.config import base_config


def get_config():
  return base_config()
