"""nmm-compile: the real train step compiled for targets that are not attached (cpu-8 here, a v5p
slice through libtpu's compile-only devices), with memory, FLOPs and collectives checked against
hand-computed values."""
import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import config_module, tiny_config
from nmm_jax import config as config_lib
from nmm_jax.compile import hlo, report, topologies
from nmm_jax.scaling import flops

ROOT = os.path.join(os.path.dirname(__file__), "..")
JSON_FIELDS = ("topology", "chips", "device_kind", "mesh", "per_chip_batch", "seq_len",
               "peak_bytes", "hbm_bytes", "fits", "compiled_flops_per_chip",
               "model_flops_per_chip", "collectives")


def _config_file(spec):
  """get_config(arg) of configs/FILE.py[:ARG]."""
  name, _, arg = spec.partition(":")
  module = config_module(name)
  return module.get_config(arg) if arg else module.get_config()


def _smallest_members():
  """Every configs/ file; a file of several members (SPECS) at each family's smallest, its
  first member."""
  specs = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    module = config_module(name)
    if not hasattr(module, "SPECS"):
      specs.append(name)
      continue
    families = {}
    for member in module.SPECS:
      families.setdefault(member.split("-")[0], member)
    specs += [f"{name}:{m}" for m in families.values()]
  return specs


@pytest.fixture(scope="module")
def cpu8():
  return topologies.target("cpu-8")


@pytest.mark.parametrize("spec", _smallest_members())
def test_every_config_compiles_for_cpu8(spec, cpu8):
  config = _config_file(spec)
  r = report.compile_step(config, cpu8, per_chip_batch=1)
  assert r["peak_bytes"] > r["param_bytes"] + r["optimizer_bytes"] > 0
  assert r["global_batch"] == 8 and r["chips"] == 8 and not r["compiler_refused"]


def test_fsdp_report_equals_hand_counts(cpu8):
  """tiny with fsdp=8: every parameter with an "embed" axis holds 1/8 per chip, the QK-norm
  scales (no embed axis) are whole; AdamW keeps two moments of each; the model FLOPs are
  6 N L + 6 layers L^2 H E per sequence."""
  config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8})
  r = report.compile_step(config, cpu8, per_chip_batch=2, count_flops=True)
  m = config.model
  total = flops.param_counts(m)["total"]
  qk_norm = m.num_layers * 2 * m.head_dim
  assert r["param_bytes"] == 4 * ((total - qk_norm) // 8 + qk_norm)
  assert 0 <= r["optimizer_bytes"] - 2 * r["param_bytes"] <= 64  # + step counters
  # d 64, 2 layers, 4 heads (2 kv) of 16, mlp 128, vocab 128, 4x4x3 patches; seq 128.
  matmul = 2 * 64 * 16 * (2 * 4 + 2 * 2) + 2 * 3 * 64 * 128 + 64 * 128 + 48 * 64
  per_sequence = 6 * matmul * 128 + 6 * 2 * 128 ** 2 * 4 * 16
  assert r["model_flops_per_chip"] == per_sequence * 16 / 8
  # The compiled step computes the whole L x L attention and the patch projection of empty
  # image slots: more than the model FLOPs, but not wildly.
  assert 1.0 < r["compiled_flops_per_chip"] / r["model_flops_per_chip"] < 1.6
  batch_bytes = 16 * 128 * 4 * 8 + 16 * 6 * 16 * 16 * 3  # 8 int/float [B, L] arrays + images
  assert r["argument_bytes"] == r["param_bytes"] + r["optimizer_bytes"] + 4 + batch_bytes // 8
  assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                             + r["temp_bytes"])
  kinds = {c["kind"]: c for c in r["collectives"]}
  # ZeRO-3 weights are gathered, every layer: inside the layer scan, once per trip.
  assert kinds["all-gather"]["executed"] > kinds["all-gather"]["count"]


def test_data_parallel_all_reduces_every_gradient(cpu8):
  """Pure data parallelism: parameters replicated, gradients all-reduced: at least the whole
  f32 gradient (4 bytes per parameter) per step."""
  r = report.compile_step(tiny_config(), cpu8, per_chip_batch=1)
  total = flops.param_counts(tiny_config().model)["total"]
  assert r["param_bytes"] == 4 * total
  all_reduce = {c["kind"]: c for c in r["collectives"]}["all-reduce"]
  assert all_reduce["bytes"] >= 4 * total
  assert "all-gather" not in {c["kind"] for c in r["collectives"]}


def test_max_batch_is_the_largest_that_fits(cpu8):
  """With a chip of 40 MiB, the search returns a batch that fits and one more does not."""
  small = dataclasses.replace(cpu8, hbm_bytes=40 * 2 ** 20)
  config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8})
  best, r = report.max_per_chip_batch(config, small, log=lambda *a: None)
  assert best > 2 and r["fits"] and r["per_chip_batch"] == best
  assert not report.compile_step(config, small, best + 1)["fits"]
  # The estimate (scripts/fit_table.py --search=estimate) is a batch that fits, at most that.
  bound, r = report.max_per_chip_batch(config, small, log=lambda *a: None, exact=False)
  assert 1 <= bound <= best and r["fits"] and r["per_chip_batch"] == bound


def test_a_program_the_tpu_compiler_refuses_does_not_fit():
  """48 sequences of 2,048 tokens per 16 GiB v5e chip: the TPU compiler refuses the program;
  the report says it does not fit, with the temporaries the compiler asked for."""
  # XLA attention: its [L, L] scores make the refusal certain (flash needs a far larger batch).
  config = config_lib.with_values(_config_file("paper:early-275m"), **{"model.attention": "xla"})
  r = report.compile_step(config, topologies.target("v5e-4"), per_chip_batch=48)
  assert r["compiler_refused"] and not r["fits"]
  assert r["temp_bytes"] > r["hbm_bytes"] and r["peak_bytes"] > r["temp_bytes"]
  assert r["argument_bytes"] > r["param_bytes"] + r["optimizer_bytes"]


def test_collectives_count_loop_trips():
  text = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %ag = f32[16]{0} all-gather(f32[4]{0} %x), dimensions={0}
  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %y), to_apply=%add
  %start = (bf16[2,8]{1,0}, bf16[8,8]{1,0}) fusion(%q), kind=kCustom, calls=%chain_start
  %done = bf16[8,8]{1,0} fusion(%start), kind=kCustom, calls=%chain_done
}

%chain_start (q: bf16[2,8]) -> (bf16[2,8], bf16[8,8]) {
  %ag.1 = bf16[8,8]{1,0} all-gather(%q), channel_id=4, frontend_attributes={chain_id="0"}
}

%chain_done (s: (bf16[2,8], bf16[8,8])) -> bf16[8,8] {
  %ag.2 = bf16[8,8]{1,0} all-gather(%q2), channel_id=4, frontend_attributes={chain_id="0"}
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %c = s32[]{:T(128)} constant(6)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%all-reduce-scatter.1.clone (input.8: bf16[16,8]) -> bf16[4,8] {
  %pad = bf16[16,8]{1,0} pad(%input.8, %zero), padding=0_0x0_0
  %all-reduce.9 = bf16[16,8]{1,0} all-reduce(%pad), replica_groups={{0,1,2,3}}, to_apply=%add
}

%async_collective_fusion.3 (p: bf16[2,8]) -> bf16[8,8] {
  %ag2 = bf16[8,8]{1,0} all-gather(bf16[2,8]{1,0} %p), dimensions={0}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %fusion.7 = bf16[8,8]{1,0} fusion(%g), kind=kCustom, calls=%async_collective_fusion.3
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
  %rs = bf16[2,3]{1,0} reduce-scatter(bf16[16,3]{1,0} %z), dimensions={0}
  %fusion.5 = bf16[4,8]{1,0} fusion(%f), kind=kCustom, calls=%all-reduce-scatter.1.clone
}
"""
  got = {c["kind"]: c for c in hlo.collectives(text)}
  # A fusion restating an async collective (TPU preset) is not a second gather, nor is each
  # later link of a chain (one channel, one chain_id: the preset's start/continuation/done).
  assert got["all-gather"] == {"kind": "all-gather", "count": 2, "executed": 12,
                               "bytes": 6 * 64 + 6 * 128,
                               "dtypes": {"f32": 6 * 64, "bf16": 6 * 128}}
  assert got["all-reduce"] == {"kind": "all-reduce", "count": 1, "executed": 6, "bytes": 6 * 32,
                               "dtypes": {"f32": 6 * 32}}
  # libtpu's reduce-scatter (a fusion calling an all-reduce-scatter computation) counts once,
  # as a reduce-scatter with the fusion's result; the all-reduce inside it is not counted.
  assert got["reduce-scatter"] == {"kind": "reduce-scatter", "count": 2, "executed": 2,
                                   "bytes": 12 + 64, "dtypes": {"bf16": 12 + 64}}


def test_topology_names():
  assert topologies.chip_grid(4, 3) == "2x2x1" and topologies.chip_grid(32, 3) == "2x4x4"
  assert topologies.chip_grid(256, 2) == "16x16" and topologies.chip_grid(8, 2) == "2x4"
  with pytest.raises(topologies.TopologyError, match="unknown topology"):
    topologies.target("tpu-7")
  with pytest.raises(topologies.TopologyError, match="must be even"):
    topologies.target("v5p-3")
  try:
    import jax_cuda12_plugin  # noqa: F401
  except ImportError:
    with pytest.raises(topologies.TopologyError, match=r"compile-gpu"):
      topologies.target("h100-8")
  else:
    h100 = topologies.target("h100-8")
    assert len(h100.devices) == 8 and h100.device_kind.startswith("NVIDIA H100")
    assert len(topologies.target("h100-16").devices) == 16  # two hosts
    r = report.compile_step(tiny_config(), h100, per_chip_batch=1)
    assert r["fits"] and r["hbm_bytes"] == 84978434048 and r["compiled_flops_per_chip"] is None


def _nmm_compile(*flags):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  return subprocess.run([sys.executable, "-m", "nmm_jax.compile", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_compiles_a_paper_config_for_a_v5p_slice():
  """The smallest paper model on v5p-8 (4 chips, FSDP): fits, with the JSON fields; libtpu's
  start-up warnings stay hidden."""
  # (At seq 512, not the paper's 2048: the CLI, the layout and the fit are the test, and the
  # shorter sequence compiles faster. docs/models.md has the paper lengths.)
  result = _nmm_compile("--config=configs/paper.py:early-275m", "--topology=v5p-8",
                        "--per_chip_batch=2", "--noflops", "--config.mesh.data=1",
                        "--config.mesh.fsdp=-1", "--config.data.seq_len=512")
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(JSON_FIELDS) <= set(r)
  assert r["device_kind"] == "TPU v5" and r["chips"] == 4 and r["fits"]
  assert r["xla_flags"] == "auto"  # compiled with the flags the run would use
  assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  assert r["hbm_bytes"] == 95 * 2 ** 30
  # f32 parameters (4 bytes each) split four ways.
  assert abs(r["param_bytes"] - r["params"]) < 1e5
  # Weights are cast to bf16 where they are stored, so FSDP's gathers move bf16.
  collectives = {c["kind"]: c for c in r["collectives"]}
  gathers = collectives["all-gather"]
  assert gathers["dtypes"].get("bf16", 0) > 0.9 * gathers["bytes"]
  # ZeRO-3: the layers' weight gradients are reduce-scattered (models/dense.py); what is still
  # all-reduced is the LM head's bf16 [800, 50304] gradient (libtpu's choice) and the norm
  # scales. Left to the compiler, the attention and down-projection gradients were all-reduced
  # too: 189 MiB against 77.
  assert collectives["all-reduce"]["bytes"] < 1.1 * 800 * 50304 * 2
  assert "TPU_WORKER_HOSTNAMES" not in result.stderr and "libtpu" not in result.stderr
  assert "peak estimate" in result.stdout
  # libtpu's own live-buffer peak is reported beside the estimate, and is not above it.
  assert 0 < r["compiler_peak_bytes"] <= r["peak_bytes"]
  assert "compiler's peak" in result.stdout


def test_cli_errors_are_one_line():
  result = _nmm_compile("--config=configs/tiny.py", "--topology=v9-8")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("nmm-compile: unknown topology")
  # (--topology cpu-8, as absl also takes it: the 8 host devices are still made.)
  result = _nmm_compile("--config=configs/tiny.py", "--topology", "cpu-8", "--per_chip_batch=1",
                        "--config.mesh.fsdp=3")
  assert result.returncode != 0 and "config.mesh" in result.stderr
  result = _nmm_compile("--config=configs/tiny.py", "--topology=cpu-8", "--per_chip_batch=1",
                        "--max_batch")
  assert result.returncode != 0 and "exclude each other" in result.stderr.strip().splitlines()[-1]


def test_plain_start_up_is_quiet():
  """libtpu is installed (test extra) but no TPU is attached: importing the package and
  starting JAX prints nothing."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  result = subprocess.run([sys.executable, "-c", "import nmm_jax, jax; print(jax.devices())"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "CpuDevice" in result.stdout
  assert result.stderr == ""


def test_sequence_parallelism_reduce_scatters_on_a_tpu():
  """Megatron sequence parallelism as libtpu compiles it (d 256 x 6 layers, bf16, fsdp=2 x
  tensor=2 on v5p-8): tensor parallelism's all-reduces after attention and the MLP become
  reduce-scatters (and all-gathers before them), and temporaries fall. (A few [tokens, D]
  all-reduces stay, once per step outside the layers; six layers keep them a small share, and
  the layer scan compiles once whatever the depth.)"""
  shape = {"model.d_model": 256, "model.num_layers": 6, "model.num_heads": 4,
           "model.num_kv_heads": 2, "model.head_dim": 64, "model.mlp_dim": 512,
           "data.seq_len": 128, "train.loss_chunk": 128, "model.dtype": "bfloat16",
           "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
  v5p = topologies.target("v5p-8")
  reports = [report.compile_step(tiny_config(**shape, **{"mesh.sequence_parallel": sp}), v5p, 4)
             for sp in (False, True)]
  (plain, split) = ({c["kind"]: c["bytes"] for c in r["collectives"]} for r in reports)
  assert split.get("all-reduce", 0) < 0.1 * plain["all-reduce"]
  assert split["reduce-scatter"] > plain.get("reduce-scatter", 0) + 0.3 * plain["all-reduce"]
  assert reports[1]["temp_bytes"] < 0.95 * reports[0]["temp_bytes"]
