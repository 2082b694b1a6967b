r"""The default job with late fusion: a 4-layer ViT (width 64) trained from scratch, its layers
1 and 4 concatenated before the connector (input_concat, the best mode in Lin et al. 2025).

  python -m nmm_jax.train --config=configs/late_default.py --workdir=runs/late_default
"""
from nmm_jax.config import base_config


def get_config():
  c = base_config()
  c.data.augment.update(crop_scale=(1.0, 1.0), flip_prob=0.0)  # see configs/default.py
  c.data.num_workers = 1
  c.model.update(fusion="late", vision_fusion="input_concat", vision_layers=(0, -1))
  c.model.vision.update(d_model=64, num_layers=4, num_heads=4, mlp_dim=256, num_patches=16)
  return c
