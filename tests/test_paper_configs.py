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
  elif family == "late":  # 8 of the 24 layers moved to the ViT, matched to the early total
    early = flops.param_counts(GET_CONFIG(f"early-{size}").model)
    assert abs(counts["total"] / early["total"] - 1) < 0.002
  else:  # 8 experts top-1: the early model's active parameters plus the routers
    early = flops.param_counts(GET_CONFIG(f"early-{size}").model)
    m = config.model
    assert counts["matmul"] == early["matmul"] + m.num_layers * m.d_model * 8


@pytest.mark.parametrize("spec", [s for s in SPECS if s.startswith("late-")])
def test_heads_are_of_64_in_multiples_of_4(spec):
  """Decoder and ViT: heads of 64 (the MXU's and tensor cores' tiles), as many as a tensor axis
  of 2 or 4 divides, and MLPs in multiples of 128, at every width (64 divides none of 800, 2208
  and 3232: heads x 64 differs from d there)."""
  m = GET_CONFIG(spec).model
  v = m.vision
  assert m.head_dim == config_lib.vision_head_dim(v) == 64
  assert m.num_heads % 4 == 0 and m.num_kv_heads % 4 == 0 and v.num_heads % 4 == 0
  assert m.mlp_dim % 128 == 0 and v.mlp_dim % 128 == 0
  assert abs(v.num_heads * 64 - v.d_model) <= 96 and abs(m.num_heads * 64 - m.d_model) <= 96


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
