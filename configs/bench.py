r"""Train-step benchmark shape: a text-only decoder (vocab 32768, d 512, 4 layers, seq 512,
batch 8).

  python -m nmm_jax.bench --config=configs/bench.py
  # with images (4 per row, 64 patches each), early or late fusion:
  python -m nmm_jax.bench --config=configs/bench.py --config.bench.images_per_row=4
  python -m nmm_jax.bench --config=configs/bench.py --config.bench.images_per_row=4 \
      --config.model.fusion=late
"""
from nmm_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=32768, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8,
                 head_dim=64, mlp_dim=1536, tie_embeddings=False, dtype="float32",
                 param_dtype="float32", remat="none",
                 scan_unroll=4)  # 4 layers unrolled: no loop, 10% faster step on CPU
  c.data.update(seq_len=512, image_size=64)
  c.train.update(batch_size=8)
  # Images, when bench.images_per_row > 0: 64x64 pixels in 8x8 patches (64 per image). The late
  # fusion encoder: width 512, 4 layers, input_concat of layers 2 and 4.
  c.model.update(patch_size=8, vision_fusion="input_concat", vision_layers=(1, -1))
  c.model.vision.update(d_model=512, num_layers=4, num_heads=8, mlp_dim=2048, num_patches=64)
  c.bench = dict(warmup_steps=2, timed_steps=5, matmul_size=4096, images_per_row=0)
  return c
