r"""Dense vs MoE in miniature (docs/moe.md): the default job's early-fusion model, dense or with
every MLP an MoE of 8 experts, top-1, trained for the same steps on the embedded shapes data.

  .venv/bin/python scripts/moe_study.py --out=runs/moe_study   # all three, then table + figures
  # or one at a time, on the data the script built under runs/moe_study/data:
  python -m nmm_jax.train --config=configs/moe_study.py:dense --workdir=runs/moe_study/dense \
      --config.data.dir=runs/moe_study/data
  python -m nmm_jax.train --config=configs/moe_study.py:moe-learned \
      --workdir=runs/moe_study/moe-learned --config.data.dir=runs/moe_study/data
  python -m nmm_jax.train --config=configs/moe_study.py:moe-modality \
      --workdir=runs/moe_study/moe-modality --config.data.dir=runs/moe_study/data

VARIANT (the text after the colon): dense | moe-learned | moe-modality.
* dense: configs/default.py's model (d 128, 4 layers, SwiGLU MLP 384), batch 16 x 256.
* moe-learned: every layer's MLP is 8 experts of that same SwiGLU, top-1, one learned router
  over all of them (the paper's modality-agnostic MoE).
* moe-modality: the same experts, image tokens routed among experts 0-3, text among 4-7.

Equal training FLOPs: a top-1 token passes one expert, i.e. the dense model's MLP, plus a
128 x 8 router; with the same steps and batch the runs see the same tokens, so the MoE runs'
compute is the dense run's plus the routers'. `scaling/flops.py` counts N (matmul parameters a
token passes) 827,392 dense and 831,488 MoE (+4,096: 4 routers of 128 x 8), and 1.4722 vs
1.4785 GFLOP per training sequence (+0.43%): 2.827e12 vs 2.839e12 FLOPs over the 120 steps x 16
sequences. The MoE holds 7 more experts per layer: 4,978,048 parameters in all vs 845,184.
Without data.dir each run builds the shapes data under its own workdir; scripts/moe_study.py
builds it once under OUT/data and passes data.dir to all three.
"""
from nmm_jax.config import base_config

VARIANTS = ("dense", "moe-learned", "moe-modality")
# Measured on the 2-core CPU (docs/moe.md): moe-learned, the slowest, takes 2.6 s a step lightly
# loaded (about 4 s with other jobs running; dense 0.5 s: XLA:CPU's ragged_dot is slow), plus
# about a minute to compile and one or more for the final eval: 120 steps keep it near 8 minutes.
STEPS = 120


def get_config(variant: str = "dense"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/moe_study.py: expected one of {VARIANTS}, got {variant!r}")
  c = base_config()
  # configs/default.py's job: the shapes captions state position and count, so no flips or
  # crops; one data worker keeps the step fed on 2 cores.
  c.data.augment.update(crop_scale=(1.0, 1.0), flip_prob=0.0)
  c.data.num_workers = 1
  # The default's 300 held-out documents per source give 9 eval batches (2,400 scored caption
  # tokens); 1,500 give five times as many, for a steadier comparison of close losses.
  c.data.synthetic.update(eval_docs=1500)
  if variant != "dense":
    c.model.moe.update(num_experts=8, top_k=1, every=1, first_dense_layers=0,
                       routing=variant.removeprefix("moe-"))
  # Same schedule for all three: warmup 30, constant, 1-sqrt cooldown over the last 20%.
  c.train.update(steps=STEPS, log_every=10)
  # One evaluation, at the end: held-out loss over the whole eval split (one pass, ending with
  # the first source to run out: num_batches above its length just means all of it), caption
  # accuracy on 64 held-out pictures (chance: colour 1/5, shape 1/3, count 1/3, region 1/4).
  c.eval.update(every_steps=STEPS, num_batches=1000, captions=64)
  c.checkpoint.update(every_steps=60)
  return c
