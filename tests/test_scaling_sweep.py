"""nmm-scaling end to end: plan a sweep, run 2 real training runs, collect them into a table
whose N, D, C are the counted ones, plot; and the plots with a fitted law."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import config_module as conftest_module
from conftest import load_config
from nmm_jax.data import world
from nmm_jax.scaling import flops, sweep
from nmm_jax.scaling.collect import average_seeds
from nmm_jax.scaling.fit import ScalingLaw
from nmm_jax.scaling.table import write_runs


def nmm_scaling(*args):
  out = subprocess.run([sys.executable, "-m", "nmm_jax.scaling.cli", *args], capture_output=True,
                       text=True, timeout=900, stdin=subprocess.DEVNULL)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_plan_sizes_models_by_width_and_steps_by_budget():
  config = load_config("scaling_tiny")
  runs, skipped = sweep.plan(config, [32, 64, 128], budgets=[5e11, 4e12], min_steps=300)
  assert [r.name for r in runs] == ["C5e11_w32", "C5e11_w64", "C4e12_w32", "C4e12_w64",
                                    "C4e12_w128"]
  assert skipped == ["C5e11_w128: 232 steps < 300"]
  for run in runs:
    model = config.model.copy_and_resolve_references()
    model.update({k.split(".", 1)[1]: v for k, v in run.overrides.items()
                  if k.startswith("model.")})
    assert model.d_model == run.width and model.num_heads * model.head_dim == run.width
    assert model.num_heads == 2 * model.num_kv_heads and model.mlp_dim == 2 * run.width
    step_flops = flops.train_flops_per_sequence(model, 128) * 8
    assert abs(run.C - run.budget) <= step_flops / 2  # steps rounded to the budget
    assert run.N == flops.param_counts(model)["matmul"] and run.D == run.steps * 8 * 128
    o = run.overrides
    assert o["train.warmup_steps"] <= 0.1 * run.steps and o["train.cooldown_fraction"] == 0.2
    assert o["train.schedule"] == "inverse_sqrt" and o["eval.every_steps"] == run.steps
  with pytest.raises(ValueError, match="not a multiple of model.head_dim"):
    sweep.plan(config, [40], budgets=[1e12])


def test_plan_window_of_tokens_per_parameter_and_late_encoders():
  config = load_config("scaling_world")
  runs, skipped = sweep.plan(config, [32, 64, 128], budgets=[1e12], tokens_per_param=(1, 100))
  assert [r.name for r in runs] == ["C1e12_w32", "C1e12_w64"]
  assert skipped == ["C1e12_w128: D/N 0.579 outside 1-100"]
  assert all(1 <= r.D / r.N <= 100 for r in runs)
  # A learning rate per width: halved at each doubling from the family's d_model (64).
  runs, _ = sweep.plan(config, [32, 64, 128], budgets=[1e12], lr_width_exponent=1.0)
  assert [r.overrides["train.lr"] for r in runs] == [6e-3, 3e-3, 1.5e-3]
  assert "train.lr" not in sweep.plan(config, [32], budgets=[1e12])[0][0].overrides
  # A smaller batch for short runs: halved from 16 until 500 steps, no lower than min_batch;
  # the held-out set stays 256 sequences.
  runs, _ = sweep.plan(config, [32, 64, 128], budgets=[1e12], target_steps=500, min_batch=4)
  assert [(r.batch, r.steps) for r in runs] == [(16, 1766), (16, 530), (4, 589)]
  assert "train.batch_size" not in runs[0].overrides
  o = runs[2].overrides
  assert o["train.batch_size"] == 4 and o["eval.num_batches"] * 4 == 16 * 16
  assert runs[2].D == 589 * 4 * 128 and abs(runs[2].C - 1e12) < runs[2].C / 589
  assert sweep.plan(config, [128], budgets=[1e12], target_steps=10_000)[0][0].batch == 1
  with pytest.raises(ValueError, match="min_batch must be between 1 and"):
    sweep.plan(config, [32], budgets=[1e12], target_steps=500, min_batch=32)
  late = conftest_module("scaling_world").get_config("late")
  (run,), _ = sweep.plan(late, [128], budgets=[1e13])
  v = {k: run.overrides[f"model.vision.{k}"] for k in ("d_model", "num_heads", "mlp_dim")}
  assert v == {"d_model": 128, "num_heads": 8, "mlp_dim": 512}  # as wide as the decoder
  model = sweep._resized_model(late, run.overrides)
  counts = flops.param_counts(model)
  # The encoder's share of the matmul parameters stays about half (2 of 4 layers).
  assert 0.4 < counts["vision_matmul"] / (counts["vision_matmul"] + counts["matmul"]) < 0.6


def test_seeds_are_replicates_and_collect_averages_them():
  config = load_config("scaling_world")
  runs, _ = sweep.plan(config, [32], budgets=[1e12], seeds=3)
  assert [r.name for r in runs] == ["C1e12_w32_s0", "C1e12_w32_s1", "C1e12_w32_s2"]
  assert [r.overrides["train.seed"] for r in runs] == [config.train.seed + k for k in range(3)]
  assert len({(r.N, r.D, r.steps, r.C) for r in runs}) == 1
  (single,), _ = sweep.plan(config, [32], budgets=[1e12])
  assert single.name == "C1e12_w32" and "train.seed" not in single.overrides
  with pytest.raises(ValueError, match="seeds must be at least 1"):
    sweep.plan(config, [32], budgets=[1e12], seeds=0)

  row = {"N": 100, "D": 1000, "steps": 10, "C": 6e5}
  rows = [dict(row, run="C1_w32_s0", seed=0, loss=1.0, **{"loss/text": 2.0}),
          dict(row, run="C1_w32_s1", seed=1, loss=1.2, **{"loss/text": 2.4}),
          dict(row, run="C1_w64", seed=0, N=400, loss=0.9, **{"loss/text": 1.8})]
  averaged = {r["run"]: r for r in average_seeds(rows)}
  assert averaged["C1_w32"]["loss"] == pytest.approx(1.1)
  assert averaged["C1_w32"]["loss/text"] == pytest.approx(2.2)
  assert averaged["C1_w32"]["loss_sd"] == pytest.approx(np.std([1.0, 1.2], ddof=1))
  assert averaged["C1_w32"]["seeds"] == 2 and "seed" not in averaged["C1_w32"]
  assert averaged["C1_w64"] == dict(rows[2], seeds=1)
  with pytest.raises(ValueError, match="not seeds of one run"):
    average_seeds([rows[0], dict(rows[1], steps=11)])


def test_two_run_sweep_collect_and_plot(tmp_path):
  out = str(tmp_path / "sweep")
  # On the embedded world data (the scaling study's), so the table carries its entropy floor.
  args = ["sweep", "--config=configs/tiny.py", "--widths=32,64", "--tokens=30720",
          "--min_steps=10", f"--out={out}", "--config.eval.num_batches=1",
          "--config.data.synthetic.kind=world", "--config.model.vocab_size=176"]
  printed = nmm_scaling(*args)  # without --run: the plan and the commands
  assert printed.count("-m nmm_jax.train") == 2 and "--config.train.steps=30" in printed
  ran = nmm_scaling(*args, "--run")
  assert ran.count("eval loss") == 2
  assert nmm_scaling(*args, "--run").count("already done") == 2  # a rerun skips finished runs

  table = str(tmp_path / "runs.csv")
  nmm_scaling("collect", os.path.join(out, "*"), f"--out={table}")
  with open(table) as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == ["D3.1e04_w32", "D3.1e04_w64"]
  config = load_config("tiny")
  for width, heads in ((32, 2), (64, 4)):
    row = rows[f"D3.1e04_w{width}"]
    model = config.model.copy_and_resolve_references()
    model.update(d_model=width, num_heads=heads, num_kv_heads=heads // 2, mlp_dim=2 * width,
                 vocab_size=176)
    assert int(row["N"]) == flops.param_counts(model)["matmul"]
    assert int(row["N_total"]) == flops.param_counts(model)["total"]
    assert int(row["D"]) == 30 * 8 * 128 and int(row["steps"]) == 30 and row["batch"] == "8"
    assert float(row["lr"]) == config.train.lr
    assert float(row["C"]) == pytest.approx(flops.train_flops_per_sequence(model, 128) * 240)
    for key in ("loss", "loss/caption", "loss/interleaved", "loss/text"):
      floor = float(row[key.replace("loss", "floor")])
      assert 0.05 < floor < float(row[key]) < 6, key   # 30 steps: far above the floor
  floors = world.entropy_floor(world.read_entropy_file(os.path.join(out, "data")),
                               dict(config.data.mixture))
  assert float(row["floor"]) == pytest.approx(floors["loss"])
  assert row["seed"] == "0" and row["seeds"] == "1"

  # Two seeds of one run (copies of a finished run, the second's held-out loss raised by 0.1):
  # collect writes one row, their mean, with their spread.
  seeds = tmp_path / "seeds"
  for k in (0, 1):
    shutil.copytree(os.path.join(out, "D3.1e04_w32"), seeds / f"D3.1e04_w32_s{k}")
  metrics = seeds / "D3.1e04_w32_s1" / "metrics.jsonl"
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  records[-1]["eval/loss"] += 0.1
  metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
  printed = nmm_scaling("collect", str(seeds / "*"), f"--out={tmp_path / 'seeds.csv'}")
  assert "1 rows from 2 runs" in printed and "mean of 2 seeds" in printed
  with open(tmp_path / "seeds.csv") as f:
    (averaged,) = list(csv.DictReader(f))
  assert averaged["run"] == "D3.1e04_w32" and averaged["seeds"] == "2"
  assert float(averaged["loss"]) == pytest.approx(float(rows["D3.1e04_w32"]["loss"]) + 0.05)
  assert float(averaged["loss_sd"]) == pytest.approx(0.1 / 2 ** 0.5)

  plots = str(tmp_path / "plots")
  printed = nmm_scaling("plot", f"--csv={table}", f"--out={plots}")
  assert "law is not fitted" in printed
  assert sorted(os.listdir(plots)) == ["frontier.png", "isoflop.png", "loss_vs_compute.png",
                                       "per_source.png"]


def test_plots_with_a_fitted_law(tmp_path):
  law = ScalingLaw(E=1.5, A=300.0, B=900.0, alpha=0.35, beta=0.3)
  rows = []
  for budget in (1e15, 1e16, 1e17):
    for n in np.geomspace(1e5, 1e7, 4):
      d = budget / (6 * n)
      loss = law.loss(n, d)
      rows.append({"N": n, "N_total": n, "D": d, "C": budget, "loss": loss,
                   "loss/text": loss * 1.1, "budget": budget, "run": f"{budget:.0e}_{n:.0e}"})
  table = str(tmp_path / "runs.csv")
  write_runs(table, rows)
  printed = nmm_scaling("plot", f"--csv={table}", f"--out={tmp_path / 'plots'}")
  assert "law is not fitted" not in printed
  for name in ("frontier", "isoflop", "loss_vs_compute", "per_source"):
    assert os.path.getsize(tmp_path / "plots" / f"{name}.png") > 10_000, name
