"""nmm-scaling sweep: plan a scaling sweep and run it here, or print its commands.

  nmm-scaling sweep --config=configs/scaling_tiny.py --widths=32,64,96 \\
      --budgets=2e12,6e12,2e13 --out=runs/sweep [--run]

Without --run, prints one training command per run (for a cluster: prefix them with
--command_prefix, e.g. "sbatch --wrap"). With --run, runs them one after another; a run that
already finished is skipped, so an interrupted sweep continues where it stopped. Writes
OUT/sweep.json (the plan) and OUT/<run>/sweep_run.json.
"""
import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

from nmm_jax.scaling import sweep as sweep_lib
from nmm_jax.scaling.collect import RUN_FILE, final_eval

config_flags.DEFINE_config_file("config", None, "Family config file.", lock_config=False)
flags.DEFINE_list("widths", None, "Model widths (d_model) at the family's depth.")
flags.DEFINE_list("budgets", [], "Training FLOP budgets, e.g. 1e12,3e12.")
flags.DEFINE_list("tokens", [], "Or token counts per run (sizes x tokens grid).")
flags.DEFINE_string("out", None, "Sweep folder: one workdir per run.")
flags.DEFINE_integer("min_steps", 20, "Leave out runs shorter than this.")
flags.DEFINE_list("tokens_per_param", [],
                  "LOW,HIGH: leave out runs whose tokens per parameter (D/N) fall outside.")
flags.DEFINE_integer("seeds", 1, "Train each run with this many seeds (NAME_s0, NAME_s1, ...; "
                     "collect averages them): one small run's loss varies by several percent "
                     "from seed to seed.")
flags.DEFINE_float("lr_width_exponent", 0.0,
                   "p: each width's learning rate is train.lr * (the family's d_model / width)^p "
                   "(0: train.lr at every width).")
flags.DEFINE_integer("target_steps", 0,
                     "Train a run that would make fewer steps than this at the family's batch at "
                     "a smaller one (halved, down to --min_batch, until it makes them): runs of "
                     "a few hundred steps are limited by their updates, not by N or D.")
flags.DEFINE_integer("min_batch", 1, "The smallest batch --target_steps goes down to (at least "
                     "the data-parallel device count).")
flags.DEFINE_bool("run", False, "Run the sweep here, one run after another.")
flags.DEFINE_string("command_prefix", "", "Printed before each command (e.g. 'sbatch --wrap').")
flags.mark_flags_as_required(["config", "widths", "out"])
FLAGS = flags.FLAGS


def _config_overrides() -> list:
  """The --config.* flags given to the sweep, passed on to every run, and data.dir: the
  embedded data is built once for the sweep, not once per run."""
  given = [a for a in sys.argv[1:] if a.startswith("--config.")]
  if FLAGS.config.data.dir:
    return given
  directory = sweep_lib.ensure_shared_data_dir(FLAGS.config, FLAGS.out,
                                               log=lambda m: print(m, flush=True))
  return given + [f"--config.data.dir={directory}"]


def _tokens_per_param():
  if not FLAGS.tokens_per_param:
    return None
  window = [float(v) for v in FLAGS.tokens_per_param]
  if len(window) != 2 or not 0 <= window[0] <= window[1]:
    raise ValueError(f"--tokens_per_param must be LOW,HIGH with 0 <= LOW <= HIGH, got "
                     f"{','.join(FLAGS.tokens_per_param)}")
  return tuple(window)


def main(argv):
  del argv
  config_file = config_flags.get_config_filename(FLAGS["config"])
  runs, skipped = sweep_lib.plan(FLAGS.config, [int(w) for w in FLAGS.widths],
                                 budgets=[float(b) for b in FLAGS.budgets],
                                 tokens=[float(t) for t in FLAGS.tokens],
                                 min_steps=FLAGS.min_steps,
                                 tokens_per_param=_tokens_per_param(), seeds=FLAGS.seeds,
                                 lr_width_exponent=FLAGS.lr_width_exponent,
                                 target_steps=FLAGS.target_steps, min_batch=FLAGS.min_batch)
  for line in skipped:
    print(f"left out {line}", file=sys.stderr)
  if not runs:
    raise ValueError("no run has enough steps: raise the budgets or lower the widths")
  os.makedirs(FLAGS.out, exist_ok=True)
  config_overrides = _config_overrides()
  with open(os.path.join(FLAGS.out, "sweep.json"), "w") as f:
    json.dump({"config": config_file, "config_overrides": config_overrides,
               "runs": [dataclasses.asdict(r) for r in runs]}, f, indent=2)
  commands = []
  for run in runs:
    workdir = os.path.join(FLAGS.out, run.name)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RUN_FILE), "w") as f:
      json.dump(dataclasses.asdict(run), f, indent=2)
    commands.append(sweep_lib.train_command(config_file, workdir, run, config_overrides))
  print(f"{len(runs)} runs; total {sum(r.C for r in runs):.3g} FLOPs")
  for run in runs:
    lr = f"  lr {run.overrides['train.lr']:.3g}" if "train.lr" in run.overrides else ""
    print(f"  {run.name:14s} N {run.N:>10,}  batch {run.batch:>4}  steps {run.steps:>6}  "
          f"D {run.D:>11,}  C {run.C:.3g}{lr}")
  if not FLAGS.run:
    for argv in commands:
      print((FLAGS.command_prefix + " " if FLAGS.command_prefix else "")
            + sweep_lib.shell_line(argv))
    return
  for i, (run, argv) in enumerate(zip(runs, commands), 1):
    workdir = os.path.join(FLAGS.out, run.name)
    done = final_eval(workdir, run.steps)
    if done:
      print(f"[{i}/{len(runs)}] {run.name}: already done, eval loss {done['eval/loss']:.4f}")
      continue
    start = time.perf_counter()
    print(f"[{i}/{len(runs)}] {run.name}: {run.steps} steps ...", flush=True)
    with open(os.path.join(workdir, "train.log"), "a") as log:
      result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    if result.returncode != 0:
      raise RuntimeError(f"run {run.name} failed (exit {result.returncode}); its output is in "
                         f"{workdir}/train.log")
    done = final_eval(workdir, run.steps)
    print(f"[{i}/{len(runs)}] {run.name}: eval loss {done['eval/loss']:.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
