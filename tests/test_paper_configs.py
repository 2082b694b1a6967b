"""configs/paper.py: the paper's model families. Our counts equal the parameters of the real
models, the early-fusion ones are within 1% of the paper's, and `nmm-scaling params` prints
them."""
import os
import subprocess
import sys

import jax
import pytest

from conftest import model_param_count
from nmm_jax import config as config_lib
from nmm_jax.scaling import flops
from nmm_jax.scaling.param_table import load_family

ROOT = os.path.join(os.path.dirname(__file__), "..")
SPECS, REFERENCE, GET_CONFIG = load_family(os.path.join(ROOT, "configs", "paper.py"))


@pytest.mark.parametrize("spec", SPECS)
def test_counted_parameters_are_the_models(spec):
  config = GET_CONFIG(spec)
  config_lib.validate(config, jax.device_count())
  counts = flops.param_counts(config.model)
  assert counts["total"] == model_param_count(config.model)
  family, size = spec.split("-")
  if family == "early":
    assert abs(counts["total"] / REFERENCE[spec] - 1) < 0.01
  elif family == "late":  # the same total within 1%: 8 of the 24 layers moved to the ViT
    assert abs(counts["total"] / REFERENCE[f"early-{size}"] - 1) < 0.01
  else:  # 8 experts top-1: the early model's active parameters plus the routers
    early = flops.param_counts(GET_CONFIG(f"early-{size}").model)
    m = config.model
    assert counts["matmul"] == early["matmul"] + m.num_layers * m.d_model * 8


def test_params_command_prints_the_table():
  out = subprocess.run([sys.executable, "-m", "nmm_jax.scaling.cli", "params",
                        "--family=configs/paper.py"], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| early-932m | 1632 | 24 | 932.3M | 850.1M | - |" in out.stdout
  assert len(out.stdout.strip().splitlines()) == 2 + len(SPECS)
  bad = subprocess.run([sys.executable, "-m", "nmm_jax.scaling.cli", "params",
                        "--config=configs/paper.py:late-932m",
                        "--config.model.vision.num_layers=2"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       cwd=ROOT)
  assert bad.returncode != 0 and "config.model.vision_layers" in bad.stderr
