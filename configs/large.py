r"""Beyond the paper's sizes, for accelerator runs: early fusion at ~1B parameters with
4,096-token sequences, and at ~7B (the Llama-2-7B block shape). Pick one after the colon:

  nmm-compile --config=configs/large.py:early-7b --topology=v5p-64 --max_batch
  python -m nmm_jax.train --config=configs/large.py:early-1b-seq4k --workdir=runs/early-1b \
      --config.data.dir=DATA

* early-1b-seq4k: d 2048, 16 layers, 16 heads of 128, MLP 5,632; 4,096 tokens with up to 8
  images of 224x224 per sequence.
* early-7b: d 4096, 32 layers, 32 heads of 128, MLP 11,008; 2,048 tokens, 4 images.

The rest is configs/paper.py's recipe: 50,304-entry vocabulary, untied embeddings, 14x14
patches, bf16 compute, full remat, parameters sharded over every chip (fsdp), batch 256 and 20
tokens per parameter.
"""
import math

from nmm_jax.config import base_config
from nmm_jax.scaling import flops

SIZES = {
    # name: (d_model, layers, heads of 128, mlp, seq_len, images per sequence)
    "early-1b-seq4k": (2048, 16, 16, 5632, 4096, 8),
    "early-7b": (4096, 32, 32, 11008, 2048, 4),
}
SPECS = tuple(SIZES)


def get_config(spec: str = "early-1b-seq4k"):
  if spec not in SIZES:
    raise ValueError(f"configs/large.py: expected one of {SPECS}, got {spec!r}")
  d, layers, heads, mlp, seq_len, images = SIZES[spec]
  c = base_config()
  c.data.update(seq_len=seq_len, image_size=224, max_images=images)
  c.model.update(vocab_size=50_304, d_model=d, num_layers=layers, num_heads=heads,
                 num_kv_heads=heads, head_dim=128, mlp_dim=mlp, patch_size=14,
                 dtype="bfloat16", remat="full")
  c.mesh.update(data=1, fsdp=-1)
  steps = math.ceil(20 * flops.param_counts(c.model)["total"] / (256 * seq_len))
  c.train.update(batch_size=256, steps=steps, warmup_steps=min(2000, steps // 10), lr=3e-4)
  return c
