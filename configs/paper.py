r"""The model families of the NMM scaling-law paper (Shukor et al. 2025): early fusion at depth 24
and widths 800 ... 3232, with the matching late-fusion and MoE models. Pick one with the text
after the colon, FAMILY-SIZE:

  python -m nmm_jax.train --config=configs/paper.py:early-932m --workdir=runs/early-932m \
      --config.data.dir=DATA --config.train.steps=...

FAMILY: early | late | moe. SIZE: the early model's parameter count in the paper, one of
275m 468m 932m 1.63b 2.28b 3.35b. `nmm-scaling params --family=configs/paper.py` prints every
member's counted parameters beside the paper's (docs/models.md explains the differences).

* early: the decoder block of DESIGN.md (MHA, SwiGLU), MLP width 8/3 d rounded up to a multiple
  of 256 (the Llama rule), head_dim 64 where it divides the width, else 32; a 50,304-entry
  vocabulary (GPT-2's 50,257 padded to a multiple of 64), untied embeddings; 14x14 patches of
  224x224 images.
* late: the same width; the 24 layers split into a ViT of 8 (MLP 4 d, as CLIP) and a decoder of
  16, so the total is close to the early model's; input_concat of ViT layers 4 and 8.
* moe: the early model with every MLP an MoE of 8 experts, top-1 (the paper's default): the
  dense model's active size plus the routers.

Data and training settings are a starting point for an accelerator run (bf16 compute, full
remat, 20 tokens per parameter), not the paper's recipe; set data.dir to real interleaved
shards and a tokenizer of at most 50,304 entries.
"""
import math

from nmm_jax.config import base_config
from nmm_jax.scaling import flops

# The paper's early-fusion parameter count -> decoder width.
WIDTHS = {"275m": 800, "468m": 1088, "932m": 1632, "1.63b": 2208, "2.28b": 2624, "3.35b": 3232}
FAMILIES = ("early", "late", "moe")
# What `nmm-scaling params --family=configs/paper.py` lists, and the counts the paper gives.
SPECS = tuple(f"{family}-{size}" for family in FAMILIES for size in WIDTHS)
REFERENCE_PARAMS = {"early-275m": 275e6, "early-468m": 468e6, "early-932m": 932e6,
                    "early-1.63b": 1.63e9, "early-2.28b": 2.28e9, "early-3.35b": 3.35e9}
DEPTH = 24
LATE_ENCODER_LAYERS = 8
VOCAB_SIZE = 50_304


def mlp_width(d_model: int) -> int:
  return 256 * math.ceil(8 * d_model / 3 / 256)


def head_dim(d_model: int) -> int:
  return 64 if d_model % 64 == 0 else 32


def get_config(spec: str = "early-275m"):
  family, _, size = spec.partition("-")
  if family not in FAMILIES or size not in WIDTHS:
    raise ValueError(f"configs/paper.py: expected FAMILY-SIZE with FAMILY in {FAMILIES} and SIZE "
                     f"in {tuple(WIDTHS)}, got {spec!r}")
  d = WIDTHS[size]
  c = base_config()
  c.data.update(seq_len=2048, image_size=224, max_images=4)
  c.model.update(vocab_size=VOCAB_SIZE, d_model=d, num_layers=DEPTH, num_heads=d // head_dim(d),
                 num_kv_heads=d // head_dim(d), head_dim=head_dim(d), mlp_dim=mlp_width(d),
                 patch_size=14, dtype="bfloat16", remat="full")
  if family == "late":
    c.model.update(fusion="late", num_layers=DEPTH - LATE_ENCODER_LAYERS,
                   vision_fusion="input_concat", vision_layers=(3, -1))
    c.model.vision.update(d_model=d, num_layers=LATE_ENCODER_LAYERS, num_heads=d // head_dim(d),
                          mlp_dim=4 * d, num_patches=(224 // 14) ** 2)
  if family == "moe":
    c.model.moe.update(num_experts=8, top_k=1)
  # Chinchilla's 20 tokens per parameter as the default length.
  tokens_per_step = 256 * c.data.seq_len
  steps = math.ceil(20 * flops.param_counts(c.model)["total"] / tokens_per_step)
  c.train.update(batch_size=256, steps=steps, warmup_steps=min(2000, steps // 10), lr=1e-3)
  return c
