"""Collecting a runs table from training workdirs: N, D, C from the run's saved config and step
(counted by flops.py), final held-out losses from its metrics.jsonl, and on the embedded world
data its entropy floor (the loss no model can beat). Runs of one size and length trained with
several seeds (a sweep's --seeds) become one row, their mean (average_seeds)."""
import json
import os

import numpy as np

from nmm_jax import config as config_lib
from nmm_jax import storage
from nmm_jax.data import shards, world
from nmm_jax.scaling import flops
from nmm_jax.scaling.sweep import REPLICATE_SUFFIX

RUN_FILE = "sweep_run.json"


def read_metrics(workdir: str) -> list:
  """The run's metrics.jsonl records ([] before its first), local or in a bucket."""
  return storage.read_jsonl(storage.join(workdir, "metrics.jsonl"))


def final_eval(workdir: str, step: int | None = None):
  """The last metrics record with held-out losses (at `step` if given), or None."""
  evals = [r for r in read_metrics(workdir) if "eval/loss" in r]
  if step is not None:
    evals = [r for r in evals if r["step"] == step]
  return evals[-1] if evals else None


def _entropy_floor(saved, workdir: str) -> dict:
  """{"floor": ..., "floor/<source>": ...}: the generator's entropy per scored token, when the
  run read the embedded world data (data/world.py); {} otherwise."""
  directory = shards.run_data_folder(saved, workdir)
  summary = None if storage.is_remote(directory) else world.read_entropy_file(directory)
  if summary is None or not set(saved.data.mixture) <= set(summary):
    return {}
  floors = world.entropy_floor(summary, dict(saved.data.mixture))
  return {k.replace("loss", "floor", 1): v for k, v in floors.items()}


def collect_run(workdir: str) -> dict:
  """One row of the runs table; raises ValueError when the run has no checkpoint or no eval."""
  from nmm_jax.checkpoint import Checkpointer  # Orbax: only when reading checkpoints
  if not storage.path(storage.join(workdir, "checkpoints")).is_dir():
    raise ValueError(f"{workdir}: no checkpoints (not a training workdir, or not started)")
  checkpointer = Checkpointer(workdir, keep=1, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise ValueError(f"{workdir}: no complete checkpoint")
    saved = config_lib.from_saved(checkpointer.saved_config(step))
  finally:
    checkpointer.close()
  record = final_eval(workdir, step)
  if record is None:
    raise ValueError(f"{workdir}: no held-out loss at step {step} in metrics.jsonl")
  counts = flops.param_counts(saved.model)
  sequences = step * saved.train.batch_size
  row = {"N": counts["matmul"], "N_total": counts["total"], "D": sequences * saved.data.seq_len,
         "C": flops.train_flops_per_sequence(saved.model, saved.data.seq_len,
                                             saved.data.max_images) * sequences,
         "loss": record["eval/loss"], "run": os.path.basename(os.path.normpath(workdir)),
         "width": saved.model.d_model, "steps": step, "batch": saved.train.batch_size,
         "lr": saved.train.lr, "seed": saved.train.seed}
  row.update({k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/loss/")})
  row.update(_entropy_floor(saved, workdir))
  planned = os.path.join(workdir, RUN_FILE)
  if os.path.isfile(planned):
    with open(planned) as f:
      row["budget"] = json.load(f)["budget"]
  return row


def average_seeds(rows: list) -> list:
  """One row per group of seed replicates (runs named NAME_s0, NAME_s1, ...: a sweep's
  --seeds): loss and loss/<source> averaged, `loss_sd` the replicates' standard deviation
  (ddof 1), `seeds` how many; run NAME. Other rows pass through with seeds 1. A group whose
  N, D or steps differ is refused: those are not replicates of one run."""
  groups = {}
  for row in rows:
    groups.setdefault(REPLICATE_SUFFIX.sub("", row["run"]), []).append(row)
  out = []
  for name, members in groups.items():
    shape = {(m["N"], m["D"], m["steps"]) for m in members}
    if len(shape) > 1:
      raise ValueError(f"runs {', '.join(m['run'] for m in members)} differ in N, D or "
                       "steps: they are not seeds of one run")
    if len(members) == 1 and members[0]["run"] == name:
      out.append(dict(members[0], seeds=1))
      continue
    averaged = dict(members[0], run=name, seeds=len(members))
    averaged.pop("seed", None)
    losses = [k for k in members[0] if k == "loss" or k.startswith("loss/")]
    for key in losses:
      averaged[key] = float(np.mean([m[key] for m in members]))
    if len(members) > 1:
      averaged["loss_sd"] = float(np.std([m["loss"] for m in members], ddof=1))
    out.append(averaged)
  return out
