"""Planning a scaling sweep: model sizes by width at fixed depth, steps from a FLOP budget.

For each (budget or token count, width) the family config is resized:
  d_model = width; heads = width / head_dim (head_dim fixed); kv heads and mlp_dim keep the
  family's ratios (mlp_dim rounded to a multiple of 8); a late-fusion encoder as wide as the
  decoder is resized with it;
  steps = budget / (training FLOPs per step, from flops.py), or tokens / (batch * seq_len);
  learning-rate schedule as the paper trains its scaling runs: linear warmup over
  min(train.warmup_steps, 10% of the steps), constant, then a 1-sqrt cooldown over the last 20%
  (`inverse_sqrt`); one evaluation and one checkpoint, at the end.
With `lr_width_exponent` p, the learning rate is set per width: train.lr * (d_model / width)^p,
d_model the family config's (p = 1: halved at each doubling of the width, as Adam's
hidden-layer rate scales under muP; docs/scaling.md has the measurement behind it).
With `target_steps` T, a run whose budget gives fewer than T steps at the family's batch trains
at a smaller one: train.batch_size halved (to no less than `min_batch`) until it has T steps, so
the short runs are not limited by how few updates they make; eval.num_batches grows to keep the
held-out set the family's (batch x num_batches sequences).
With `seeds` > 1, each of them is run that many times (runs NAME_s0, NAME_s1, ...: train.seed
the family's plus 0, 1, ...); `nmm-scaling collect` averages them (collect.average_seeds).
"""
import dataclasses
import os
import re
import shlex
import sys

from nmm_jax.data import shards, writer
from nmm_jax.scaling import flops

COOLDOWN_FRACTION = 0.2
MAX_WARMUP_FRACTION = 0.1
# Seed replicates of a run are named NAME_s0, NAME_s1, ... (plan's `seeds`); collect groups them
# by the name without this suffix.
REPLICATE_SUFFIX = re.compile(r"_s\d+$")


def replicate_name(name: str, seed: int) -> str:
  return f"{name}_s{seed}"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  name: str
  width: int
  steps: int
  budget: float          # the FLOP budget asked for (0 for token-count sweeps)
  batch: int             # sequences per step
  N: int                 # parameters that the compute counts
  N_total: int
  D: int                 # training tokens
  C: float               # training FLOPs
  overrides: dict        # dotted config key -> value


def resize(model, width: int) -> dict:
  """Overrides of `model` (a ConfigDict) for a model of this width."""
  if width % model.head_dim:
    raise ValueError(f"width {width} is not a multiple of model.head_dim={model.head_dim}")
  heads = width // model.head_dim
  kv_ratio = model.num_heads // model.num_kv_heads
  if heads % kv_ratio:
    raise ValueError(f"width {width}: {heads} heads do not group into kv heads 1:{kv_ratio}")
  mlp_dim = max(8, round(width * model.mlp_dim / model.d_model / 8) * 8)
  overrides = {"model.d_model": width, "model.num_heads": heads,
               "model.num_kv_heads": heads // kv_ratio, "model.mlp_dim": mlp_dim}
  if model.fusion == "late" and model.vision.d_model == model.d_model:
    # An encoder as wide as the decoder stays so (the encoder's share of the parameters is
    # kept): its heads of the decoder's head_dim, its MLP ratio kept.
    v = model.vision
    overrides.update({"model.vision.d_model": width, "model.vision.num_heads": heads,
                      "model.vision.mlp_dim": max(8, round(width * v.mlp_dim / v.d_model / 8) * 8)})
    if v.head_dim:
      overrides["model.vision.head_dim"] = model.head_dim
  return overrides


def _resized_model(config, overrides):
  model = config.model.copy_and_resolve_references()
  for key, value in overrides.items():
    node, (*parents, leaf) = model, key.split(".")[1:]
    for part in parents:
      node = node[part]
    node[leaf] = value
  return model


def _batch_and_steps(amount, sequence_cost, family_batch, target_steps, min_batch):
  """(batch, steps) of a run that spends `amount` (FLOPs or tokens) at `sequence_cost` per
  sequence: the family's batch, halved while the run has fewer than `target_steps` steps and
  the half is a whole batch of at least `min_batch`."""
  batch = family_batch
  steps = round(amount / (sequence_cost * batch))
  while (steps < target_steps and batch % 2 == 0 and batch // 2 >= min_batch):
    batch //= 2
    steps = round(amount / (sequence_cost * batch))
  return batch, steps


def plan(config, widths, *, budgets=(), tokens=(), min_steps: int = 20,
         tokens_per_param=None, seeds: int = 1, lr_width_exponent: float = 0.0,
         target_steps: int = 0, min_batch: int = 1) -> tuple:
  """(runs, skipped): one run per (budget or token count, width); `skipped` names the
  combinations with fewer than `min_steps` steps, or with D/N outside `tokens_per_param`
  ((low, high), None for any): an isoFLOP study needs the widths around each budget's optimum,
  and the far-overtrained small models cost the most time on a CPU. `target_steps`,
  `min_batch`: a smaller batch for short runs (the module's docstring)."""
  if bool(budgets) == bool(tokens):
    raise ValueError("give FLOP budgets or token counts (not both)")
  if seeds < 1:
    raise ValueError(f"seeds must be at least 1, got {seeds}")
  family_batch, seq_len = config.train.batch_size, config.data.seq_len
  if not 1 <= min_batch <= family_batch:
    raise ValueError(f"min_batch must be between 1 and train.batch_size={family_batch}, got "
                     f"{min_batch}")
  runs, skipped = [], []
  for amount in (budgets or tokens):
    for width in widths:
      model_overrides = resize(config.model, width)
      model = _resized_model(config, model_overrides)
      sequence_flops = flops.train_flops_per_sequence(model, seq_len, config.data.max_images)
      batch, steps = _batch_and_steps(amount, sequence_flops if budgets else seq_len,
                                      family_batch, target_steps, min_batch)
      step_flops = sequence_flops * batch
      label = ("C" if budgets else "D") + f"{amount:.2g}".replace("+", "")
      name = f"{label}_w{width}"
      if steps < min_steps:
        skipped.append(f"{name}: {steps} steps < {min_steps}")
        continue
      counts = flops.param_counts(model)
      ratio = steps * batch * seq_len / counts["matmul"]
      if tokens_per_param and not tokens_per_param[0] <= ratio <= tokens_per_param[1]:
        skipped.append(f"{name}: D/N {ratio:.3g} outside {tokens_per_param[0]:g}-"
                       f"{tokens_per_param[1]:g}")
        continue
      overrides = {**model_overrides, "train.steps": steps,
                   "train.warmup_steps": min(config.train.warmup_steps,
                                             max(1, int(MAX_WARMUP_FRACTION * steps))),
                   "train.schedule": "inverse_sqrt",
                   "train.cooldown_fraction": COOLDOWN_FRACTION,
                   "eval.every_steps": steps, "checkpoint.every_steps": steps,
                   "checkpoint.keep": 1}
      if batch != family_batch:
        # The same held-out sequences as the family's runs: batch halvings divide its batch.
        overrides.update({"train.batch_size": batch, "eval.num_batches":
                          config.eval.num_batches * family_batch // batch})
      if lr_width_exponent:
        # To 4 significant digits: 6e-3 in the printed commands, not 0.006000000000000001.
        overrides["train.lr"] = float(
            f"{config.train.lr * (config.model.d_model / width) ** lr_width_exponent:.4g}")
      for seed in range(seeds):
        # One seed keeps the run's plain name (and the family's train.seed).
        replicate = {"train.seed": config.train.seed + seed} if seeds > 1 else {}
        runs.append(PlannedRun(replicate_name(name, seed) if seeds > 1 else name, width, steps,
                               float(amount) if budgets else 0.0, batch, counts["matmul"],
                               counts["total"], steps * batch * seq_len, step_flops * steps,
                               {**overrides, **replicate}))
  return runs, skipped


def train_command(config_file: str, workdir: str, run: PlannedRun, extra=()) -> list:
  """argv of the training run (`extra`: the family config's own --config.* overrides)."""
  return [sys.executable, "-m", "nmm_jax.train", f"--config={config_file}",
          f"--workdir={workdir}", *extra,
          *(f"--config.{k}={v}" for k, v in run.overrides.items())]


def shell_line(argv) -> str:
  return " ".join(shlex.quote(a) for a in argv)


def ensure_shared_data_dir(config, out: str, log=None) -> str:
  """The data folder every run of a sweep in `out` reads: the embedded data, built here once
  (when missing) rather than once per run; `log` is told when it is built (minutes, for the
  world data: about 3 for 300k documents per source)."""
  directory = shards.run_data_folder(config, out)
  if log and not os.path.exists(os.path.join(directory, writer.COMPLETE_MARKER)):
    s = config.data.synthetic
    log(f"building the embedded {s.kind} data ({s.train_docs:,} + {s.eval_docs:,} documents per "
        f"source) in {directory} ...")
  return shards.ensure_data_dir(config, out)
