r"""The model families of the NMM scaling-law paper (Shukor et al. 2025): early fusion at depth 24
and widths 800 ... 3232, with the matching late-fusion and MoE models. Pick one with the text
after the colon, FAMILY-SIZE:

  python -m nmm_jax.train --config=configs/paper.py:early-932m --workdir=runs/early-932m \
      --config.data.dir=DATA --config.train.steps=...

FAMILY: early | late | moe. SIZE: the early model's parameter count in the paper, one of
275m 468m 932m 1.63b 2.28b 3.35b. `nmm-scaling params --family=configs/paper.py` prints every
member's counted parameters beside the paper's (docs/models.md explains the differences).

* early: the decoder block of DESIGN.md (MHA, SwiGLU); heads of 64, as many as the multiple of 4
  nearest d / 64 (12 ... 52: tensor axes of 2 and 4 divide them); MLP width 8/3 d rounded up to
  a multiple of 256 (the Llama rule) and moved by the multiple of 128 that absorbs the attention
  width's difference from d; a 50,304-entry vocabulary (GPT-2's 50,257 padded to a multiple of
  64; libtpu all-reduces a head gradient of this width where it reduce-scatters a multiple of
  512: README, "Training"), untied embeddings; 14x14 patches of 224x224 images. docs/models.md
  gives the counts.
* late: the same width; the 24 layers split into a ViT of 8 (the decoder's heads of 64; MLP
  about 4 d as CLIP, the multiple of 128 that brings the total nearest the early model's) and a
  decoder of 16; input_concat of ViT layers 4 and 8.
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


HEAD_DIM = 64


def num_heads(d_model: int) -> int:
  """Heads of 64 (MXU / tensor-core friendly), a multiple of 4 (a tensor axis of 2 or 4 divides
  them): the multiple of 4 nearest d / 64. heads x 64 differs from d by up to 96."""
  return 4 * max(1, round(d_model / HEAD_DIM / 4))


def mlp_width(d_model: int) -> int:
  """8/3 d rounded up to a multiple of 256 (the Llama rule), then moved by the multiple of 128
  that best absorbs the attention width's difference from d (4 d (d - heads x 64) parameters
  per layer), so each block keeps the size of the paper-style block."""
  attention_gap = 4 * (d_model - num_heads(d_model) * HEAD_DIM) / 3
  return 256 * math.ceil(8 * d_model / 3 / 256) + 128 * round(attention_gap / 128)


def get_config(spec: str = "early-275m"):
  family, _, size = spec.partition("-")
  if family not in FAMILIES or size not in WIDTHS:
    raise ValueError(f"configs/paper.py: expected FAMILY-SIZE with FAMILY in {FAMILIES} and SIZE "
                     f"in {tuple(WIDTHS)}, got {spec!r}")
  d = WIDTHS[size]
  c = base_config()
  c.data.update(seq_len=2048, image_size=224, max_images=4)
  c.model.update(vocab_size=VOCAB_SIZE, d_model=d, num_layers=DEPTH, num_heads=num_heads(d),
                 num_kv_heads=num_heads(d), head_dim=HEAD_DIM, mlp_dim=mlp_width(d),
                 patch_size=14, dtype="bfloat16", remat="full")
  # Accelerator runs shard the parameters (ZeRO-3) over every chip by default.
  c.mesh.update(data=1, fsdp=-1)
  if family == "late":
    c.model.update(fusion="late", num_layers=DEPTH - LATE_ENCODER_LAYERS,
                   vision_fusion="input_concat", vision_layers=(3, -1))
    c.model.vision.update(d_model=d, num_layers=LATE_ENCODER_LAYERS, num_heads=num_heads(d),
                          head_dim=HEAD_DIM, mlp_dim=4 * d, num_patches=(224 // 14) ** 2)
    # The paper matches late models to early ones by total size: the ViT's MLP moves by the
    # multiple of 128 that brings the total nearest the early model's (3,328 ... 12,288).
    gap = (flops.param_counts(get_config(f"early-{size}").model)["total"]
           - flops.param_counts(c.model)["total"])
    c.model.vision.mlp_dim += 128 * round(gap / (LATE_ENCODER_LAYERS * 2 * d * 128))
  if family == "moe":
    c.model.moe.update(num_experts=8, top_k=1)
  # Chinchilla's 20 tokens per parameter as the default length.
  tokens_per_step = 256 * c.data.seq_len
  steps = math.ceil(20 * flops.param_counts(c.model)["total"] / tokens_per_step)
  c.train.update(batch_size=256, steps=steps, warmup_steps=min(2000, steps // 10), lr=1e-3)
  return c
