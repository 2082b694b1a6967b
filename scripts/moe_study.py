r"""Dense vs MoE in miniature (docs/moe.md): trains configs/moe_study.py's three variants one after
another on one shared copy of the shapes data, then tabulates them and draws the router figures.

  .venv/bin/python scripts/moe_study.py [--out=runs/moe_study] [--docs=docs/moe] \
      [--variants=dense,moe-learned,moe-modality] [--config.train.steps=N ...]
  .venv/bin/python scripts/moe_study.py --notrain --workdir=dense=DIR --workdir=moe-learned=DIR ...

A variant's run lives in OUT/<variant>; one whose metrics.jsonl already has the final evaluation
is skipped, and one that was interrupted resumes from its last checkpoint (the loop does that),
so the script can be run again until everything is there. --workdir=VARIANT=DIR uses a finished
run from elsewhere instead (never trained here). --config.* flags go to every run.

Writes DOCS/results.csv (one row per variant), DOCS/router_learned.png and
DOCS/router_modality.png (nmm-router-plot's figure, averaged over the last --last logged steps),
and prints the Markdown tables of docs/moe.md.
"""
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "moe_study.py")
VARIANTS = ("dense", "moe-learned", "moe-modality")
SOURCES = ("caption", "interleaved", "text")
ATTRIBUTES = ("colour", "shape", "count", "region", "all")
# Per run: how it was started and how long its training commands took (summed over resumes).
RUN_FILE = "moe_study_run.json"

_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "runs", "moe_study"),
                           "Study folder: OUT/data (shared shapes data), OUT/<variant>.")
_DOCS = flags.DEFINE_string("docs", os.path.join(ROOT, "docs", "moe"),
                            "Where results.csv and the router figures go.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run and tabulate.")
_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "VARIANT=DIR: a finished run to use as is.")
_TRAIN = flags.DEFINE_bool("train", True, "Train the variants that have not finished.")
_LAST = flags.DEFINE_integer("last", 3, "Logged steps the router figures and statistics average.")


def _train_command(variant, workdir, data_dir, overrides):
  return [sys.executable, "-m", "nmm_jax.train", f"--config={CONFIG}:{variant}",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}", *overrides]


def _expected_steps(variant, overrides):
  """train.steps of the run the command would start (the config, then a steps override)."""
  steps = load_family_config(variant).train.steps
  for arg in overrides:
    if arg.startswith("--config.train.steps="):
      steps = int(arg.split("=", 1)[1])
  return steps


def load_family_config(variant):
  """configs/moe_study.py's config of `variant` (loaded as config_flags would)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("moe_study_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def train(variant, workdir, data_dir, overrides):
  """Runs (or resumes) one variant unless its final evaluation is already in metrics.jsonl."""
  from nmm_jax.scaling.collect import final_eval
  steps = _expected_steps(variant, overrides)
  if final_eval(workdir, steps):
    print(f"{variant}: finished already ({workdir})", flush=True)
    return
  os.makedirs(workdir, exist_ok=True)
  info_path = os.path.join(workdir, RUN_FILE)
  info = {"variant": variant, "wall_s": 0.0, "commands": []}
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
  argv = _train_command(variant, workdir, data_dir, overrides)
  print(f"{variant}: {steps} steps -> {workdir}/train.log", flush=True)
  start = time.perf_counter()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    # niced: the study shares a small machine with other jobs.
    result = subprocess.run(["nice", "-n", "10", *argv], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=ROOT)
  info["wall_s"] += time.perf_counter() - start
  info["commands"].append(argv)
  with open(info_path, "w") as f:
    json.dump(info, f, indent=2)
  if result.returncode != 0:
    raise RuntimeError(f"{variant} failed (exit {result.returncode}); see {workdir}/train.log")
  if not final_eval(workdir, steps):
    raise RuntimeError(f"{variant} ended without its final evaluation; see {workdir}/train.log")
  print(f"{variant}: done in {info['wall_s']:.0f} s", flush=True)


# nmm-router-plot's per-expert statistics (train/router_plot.py defines command-line flags at
# import, so its key pattern is repeated here rather than imported).
_SHARE_KEY = re.compile(r"moe/layer(\d+)/(image|text)_share/e(\d+)$")


def _expert_counts(record) -> tuple:
  """(image, text) assignments [layers, experts] of one logged step."""
  shares = {}
  for key, value in record.items():
    m = _SHARE_KEY.match(key)
    if m:
      shares[(int(m[1]), m[2], int(m[3]))] = value
  layers, experts = 1 + max(k[0] for k in shares), 1 + max(k[2] for k in shares)
  image, text = (np.array([[shares[(l, name, e)] for e in range(experts)] for l in range(layers)])
                 for name in ("image", "text"))
  return image * record["moe/image_assignments"], text * record["moe/text_assignments"]


def router_summary(records) -> dict:
  """Router figures over `records` (logged steps with router statistics), averaged: load
  imbalance (max / mean per expert, the loop's moe/imbalance), the busiest expert's share of a
  layer's tokens (the largest over layers: 1/8 balanced, 1 collapsed), experts getting under 1%
  of a layer's tokens (summed over layers), and specialisation (mean |image share of an
  expert's tokens - overall image share|, over layers and experts: nmm-router-plot's right
  panel, averaged over layers)."""
  out = {k: float(np.mean([r[k] for r in records]))
         for k in ("moe/imbalance", "moe/load_balance", "moe/z_loss", "moe/dropped")}
  busiest, starved, fractions = [], [], []
  for r in records:
    image, text = _expert_counts(r)
    load = (image + text) / np.maximum((image + text).sum(-1, keepdims=True), 1e-9)
    busiest.append(load.max())
    starved.append(float((load < 0.01).sum()))
    fractions.append(image / np.maximum(image + text, 1e-9))
  image = sum(r["moe/image_assignments"] for r in records)
  overall = image / (image + sum(r["moe/text_assignments"] for r in records))
  out.update({"moe/busiest_expert_share": float(np.mean(busiest)),
              "moe/starved_experts": float(np.mean(starved)),
              "moe/specialisation": float(np.mean(np.abs(np.mean(fractions, 0) - overall))),
              "moe/image_share_overall": float(overall)})
  return out


def collect(variant, workdir) -> dict:
  from nmm_jax.scaling.collect import collect_run, final_eval, read_metrics
  row = {"variant": variant, **collect_run(workdir)}
  row["run"] = os.path.relpath(workdir, ROOT)
  record = final_eval(workdir, row["steps"])
  row.update({k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/caption/")})
  row["train_loss"] = record["loss"]
  records = [r for r in read_metrics(workdir) if r["step"] <= row["steps"]]
  # The first logged window holds the compile; the rest are steady steps (a few include an
  # asynchronous checkpoint save).
  steady = records[1:] or records
  row["step_time_s"] = statistics.median(r["step_time_s"] for r in steady)
  row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
  info_path = os.path.join(workdir, RUN_FILE)
  if os.path.isfile(info_path):
    with open(info_path) as f:
      row["wall_s"] = json.load(f)["wall_s"]
  routed = [r for r in records if "moe/image_assignments" in r]
  if routed:
    row.update(router_summary(routed[-_LAST.value:]))
  return row


def router_figure(workdir, path):
  """nmm-router-plot's figure of the run, averaged over its last --last logged steps."""
  subprocess.run([sys.executable, "-m", "nmm_jax.train.router_plot", f"--workdir={workdir}",
                  f"--out={path}", f"--last={_LAST.value}"], check=True, cwd=ROOT)


def _fmt(value, digits=4):
  if value is None or value == "":
    return "-"
  return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown(rows) -> str:
  lines = ["| variant | params (all) | active N | train FLOPs | eval loss | "
           + " | ".join(SOURCES) + " | step time (s) | tokens/s | wall (s) |",
           "|---" * (8 + len(SOURCES)) + "|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['N_total']:,} | {r['N']:,} | {r['C']:.3e} | "
                 f"{_fmt(r['loss'])} | " + " | ".join(_fmt(r.get(f"loss/{s}")) for s in SOURCES)
                 + f" | {_fmt(r['step_time_s'], 2)} | {_fmt(r['tokens_per_s'], 0)} | "
                 f"{_fmt(r.get('wall_s'), 0)} |")
  lines += ["", "| variant | " + " | ".join(ATTRIBUTES) + " |", "|---" * (1 + len(ATTRIBUTES))
            + "|"]
  for r in rows:
    lines.append(f"| {r['variant']} | "
                 + " | ".join(_fmt(r.get(f"caption/{a}"), 3) for a in ATTRIBUTES) + " |")
  routed = [r for r in rows if "moe/imbalance" in r]
  if routed:
    keys = ("moe/imbalance", "moe/busiest_expert_share", "moe/starved_experts",
            "moe/specialisation", "moe/load_balance", "moe/z_loss")
    lines += ["", "| variant | " + " | ".join(k[4:] for k in keys) + " |",
              "|---" * (1 + len(keys)) + "|"]
    for r in routed:
      lines.append(f"| {r['variant']} | " + " | ".join(_fmt(r[k], 3) for k in keys) + " |")
  return "\n".join(lines)


def main(argv, overrides):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint read at INFO
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; expected some of {VARIANTS}")
  given = dict(w.split("=", 1) for w in _WORKDIRS.value)
  workdirs = {v: given.get(v, os.path.join(_OUT.value, v)) for v in _VARIANTS.value}
  start = time.perf_counter()
  if _TRAIN.value:
    to_train = [v for v in _VARIANTS.value if v not in given]
    if to_train:
      from nmm_jax.data import shards
      # The shapes data, built once for the three runs (the config's data settings).
      data_dir = shards.ensure_data_dir(load_family_config("dense"), _OUT.value)
      for variant in to_train:
        train(variant, workdirs[variant], os.path.abspath(data_dir), overrides)
  rows = [collect(v, workdirs[v]) for v in _VARIANTS.value]
  os.makedirs(_DOCS.value, exist_ok=True)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  path = os.path.join(_DOCS.value, "results.csv")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  print(f"wrote {path}")
  for variant in _VARIANTS.value:
    if variant.startswith("moe-"):
      name = f"router_{variant.removeprefix('moe-')}.png"
      router_figure(workdirs[variant], os.path.join(_DOCS.value, name))
  print(markdown(rows))
  print(f"\n(this invocation: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  # --config.* flags are passed to every training run, not parsed here.
  config_args = [a for a in sys.argv[1:] if a.startswith("--config.")]
  rest = [sys.argv[0]] + [a for a in sys.argv[1:] if not a.startswith("--config.")]
  app.run(lambda argv: main(argv, config_args), argv=rest)
