"""nmm-bench runs end to end and its last line is the promised JSON (figures are not asserted:
speed is measured by the benchmark, not by tests)."""
import json
import os
import subprocess
import sys

from conftest import FAST_CPU_COMPILE

ROOT = os.path.join(os.path.dirname(__file__), "..")


SMALL = ["--config.model.vocab_size=512", "--config.model.d_model=64",
         "--config.model.num_layers=2", "--config.model.num_heads=4",
         "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
         "--config.model.mlp_dim=128", "--config.data.seq_len=128",
         "--config.bench.matmul_size=256", "--config.bench.timed_steps=2"]


def run_bench(*args) -> dict:
  # One real CPU device, as a user runs it (compiled fast: the figures are not asserted).
  env = dict(os.environ, XLA_FLAGS=FAST_CPU_COMPILE)
  result = subprocess.run([sys.executable, "-m", "nmm_jax.bench", "--config=configs/bench.py",
                           *SMALL, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_prints_figures_as_json():
  """A late-fusion model with an image per row: the early-fusion decoder is inside it, so one
  run covers both."""
  figures = run_bench("--config.bench.images_per_row=1", "--config.model.fusion=late",
                      "--config.model.vision.d_model=32", "--config.model.vision.mlp_dim=64",
                      "--config.model.vision.num_heads=2")
  for key in ("step_time_s", "tokens_per_s", "model_tflops_per_s", "mfu",
              "matmul_peak_tflops_f32", "matmul_peak_tflops_bf16", "peak_memory_bytes"):
    assert figures[key] > 0, key
  assert figures["num_devices"] == 1
  assert figures["fusion"] == "late" and figures["images_per_row"] == 1
  assert abs(figures["tokens_per_s"] * figures["step_time_s"] - 8 * 128) < 1e-3
  assert 0 < figures["mfu"] < 1


def test_generation_bench_prints_figures_as_json():
  env = dict(os.environ, XLA_FLAGS=FAST_CPU_COMPILE)
  result = subprocess.run([sys.executable, "-m", "nmm_jax.eval.cli", "bench",
                           "--config=configs/tiny.py", "--config.model.moe.num_experts=4",
                           "--batch=4", "--prompt_len=40", "--new_tokens=6", "--images=1",
                           "--repeats=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert figures["moe_experts"] == 4 and figures["images"] == 1
  # Decode figures are a difference of two timings: present, not asserted (noise at this size).
  assert "decode_tokens_per_s" in figures and "decode_step_ms" in figures
  for key in ("prefill_and_first_token_s", "generate_s", "peak_memory_bytes"):
    assert figures[key] > 0, key
