r"""The miniature scaling study's family: tiny early-fusion models on the embedded shapes data,
sized by width at depth 2 (nmm-scaling sweep sets the widths and steps).

  nmm-scaling sweep --config=configs/scaling_tiny.py --widths=32,64,128 \
      --budgets=5e11,1.5e12,4.5e12 --out=runs/scaling_tiny --run
"""
from nmm_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, patch_size=4)
  c.data.update(seq_len=128, image_size=16, max_images=6)
  c.data.augment.update(crop_scale=(1.0, 1.0), flip_prob=0.0)  # see configs/default.py
  c.data.synthetic.update(train_docs=6000, eval_docs=300)
  c.data.num_workers = 1  # the small models step faster than one core can pack
  c.train.update(batch_size=8, warmup_steps=20, log_every=50)
  # Held-out loss over 64 sequences: the differences between runs are small.
  c.eval.update(num_batches=8)
  return c
