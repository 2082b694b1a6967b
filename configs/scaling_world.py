r"""The miniature scaling study's families on data with depth (docs/scaling.md): models on the
embedded world data (data/world.py: 16,384 named creatures, popularity ~ rank^-1.1), sized by
width at a fixed depth (nmm-scaling sweep sets the widths and steps).

  nmm-scaling sweep --config=configs/scaling_world.py:early --widths=32,64,128,256 \
      --budgets=1e11,3e11,1e12,3e12,1e13 --tokens_per_param=0.3,300 --out=runs/world_early --run

FAMILY (the text after the colon; early by default):
* early: a 2-layer decoder reading image patches through a linear projection.
* late: the same decoder fed by a ViT of 2 layers as wide as the decoder (resized with it), its
  two layers concatenated before the connector (input_concat). The encoder holds about half of
  the layers and parameters: configs/paper.py's third (8 of 24) would be two thirds of a layer
  here, and input_concat needs two encoder layers to concatenate.
* moe: the early model with every MLP an MoE of 8 experts, top-1 (probability-scaled, so the
  router learns from the loss), dropless.
"""
from nmm_jax.config import base_config

FAMILIES = ("early", "late", "moe")


def get_config(family: str = "early"):
  if family not in FAMILIES:
    raise ValueError(f"configs/scaling_world.py: expected one of {FAMILIES}, got {family!r}")
  c = base_config()
  # 175 tokens: 128 name syllables, the facts' values and the template words, the specials.
  c.model.update(vocab_size=176, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=256, patch_size=4)
  # A portrait's 4x4 glyph is 4x4 patches of one cell each.
  c.data.update(seq_len=128, image_size=16, max_images=6)
  c.data.augment.update(crop_scale=(1.0, 1.0), flip_prob=0.0)  # a crop would cut the glyph
  # 300k documents per source: the CPU plan's longest runs (about 1.1e7 tokens, some 200k
  # documents of the mixture) read each document at most once.
  c.data.synthetic.update(kind="world", train_docs=300_000, eval_docs=2_000)
  c.data.num_workers = 1  # the small models step faster than one core can pack
  c.train.update(batch_size=16, lr=3e-3, warmup_steps=50, log_every=100)
  # The held-out loss over 256 sequences; no caption accuracy (it reads the shapes data).
  c.eval.update(num_batches=16, captions=0)
  if family == "late":
    c.model.update(fusion="late", vision_fusion="input_concat", vision_layers=(0, 1))
    c.model.vision.update(d_model=64, num_layers=2, num_heads=4, mlp_dim=256, num_patches=16)
  if family == "moe":
    c.model.moe.update(num_experts=8, top_k=1)
  return c
