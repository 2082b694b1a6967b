r"""The default job: a small early-fusion NMM on the embedded shapes data (a few minutes on CPU).

  python -m nmm_jax.train --config=configs/default.py --workdir=runs/default
"""
from nmm_jax.config import base_config


def get_config():
  c = base_config()
  # The shapes captions state position (left/right) and count: flips and crops would make them
  # false. Real image-text data keeps the paper's augmentation (base_config).
  c.data.augment.update(crop_scale=(1.0, 1.0), flip_prob=0.0)
  # One worker process keeps the step fed on a 2-core machine: data wait 8-9% of the step
  # in-process, 1% with the worker (`nmm-data bench`).
  c.data.num_workers = 1
  return c
