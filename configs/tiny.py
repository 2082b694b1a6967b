r"""The default job shrunk to 30 steps: tests and quick checks use it.

  python -m nmm_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""
from nmm_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, patch_size=4)
  c.data.update(seq_len=128, image_size=16, max_images=6)
  c.data.augment.update(crop_scale=(1.0, 1.0), flip_prob=0.0)  # see configs/default.py
  c.data.synthetic.update(train_docs=1500, eval_docs=100)
  c.train.update(steps=30, batch_size=8, warmup_steps=5, log_every=1)
  # Caption accuracy off: most tests train briefly and would compile generation for nothing;
  # tests/test_eval_run.py turns it on.
  c.eval.update(every_steps=15, num_batches=2, captions=0)
  c.checkpoint.update(every_steps=10)
  return c
