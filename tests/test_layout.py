"""The compiled train step is laid out as the mesh says (issue: activations carried the weights'
sharding). Read from the program XLA compiles for 8 CPU devices, with the scanned decoder:
collective bytes per step (loop bodies times their trips), temporaries and argument bytes per
device. Equal losses between meshes (test_sharding.py) cannot show any of this."""
import pytest

from conftest import tiny_config
from nmm_jax.compile import report, topologies
from nmm_jax.scaling import flops

# d 512 x 4 layers, seq 256: large enough that activations and weights differ in size.
SHAPE = {"model.d_model": 512, "model.num_layers": 4, "model.num_heads": 8,
         "model.num_kv_heads": 4, "model.head_dim": 64, "model.mlp_dim": 1536,
         "data.seq_len": 256, "train.loss_chunk": 128}
SMALL, LARGE = 2, 8  # sequences per device


def _mesh(data=1, fsdp=1, tensor=1, **more):
  return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, **more}


@pytest.fixture(scope="module")
def compiled():
  """{(mesh name, per-device batch): compile report}, each program compiled once."""
  cpu8, cache = topologies.target("cpu-8"), {}

  def get(name, per_chip_batch):
    if (name, per_chip_batch) not in cache:
      config = tiny_config(**{**SHAPE, **MESHES[name]})
      cache[name, per_chip_batch] = report.compile_step(config, cpu8, per_chip_batch)
    return cache[name, per_chip_batch]
  return get


MESHES = {
    "data8": _mesh(data=8),
    "fsdp8": _mesh(fsdp=8),
    "fsdp8_remat": _mesh(fsdp=8, **{"model.remat": "full"}),
    "fsdp8_microbatches4": _mesh(fsdp=8, **{"train.microbatches": 4}),
    "fsdp4_tensor2": _mesh(fsdp=4, tensor=2),
    "fsdp4_tensor2_remat": _mesh(fsdp=4, tensor=2, **{"model.remat": "full"}),
    "data2_fsdp2_tensor2_remat": _mesh(data=2, fsdp=2, tensor=2, **{"model.remat": "full"}),
    "fsdp4_tensor2_sp": _mesh(fsdp=4, tensor=2, **{"mesh.sequence_parallel": True}),
    "data2_fsdp2_tensor2": _mesh(data=2, fsdp=2, tensor=2),
    "fsdp8_chunk128": _mesh(fsdp=8, **{"model.vocab_size": 4096}),
    "fsdp8_chunk32": _mesh(fsdp=8, **{"model.vocab_size": 4096, "train.loss_chunk": 32}),
    # Late fusion: a 2-layer ViT of 4 heads of 64 before the decoder.
    "late_fsdp4_tensor2": _mesh(fsdp=4, tensor=2, **{
        "model.fusion": "late", "model.vision_fusion": "input_concat",
        "model.vision_layers": (0, -1), "model.vision.d_model": 256,
        "model.vision.num_layers": 2, "model.vision.num_heads": 4, "model.vision.mlp_dim": 1024}),
}


def _collective_bytes(r, kinds=None):
  return sum(c["bytes"] for c in r["collectives"] if kinds is None or c["kind"] in kinds)


def _param_bytes():
  return 4 * flops.param_counts(tiny_config(**SHAPE).model)["total"]


@pytest.mark.parametrize("name", ["fsdp8", "fsdp8_remat"])
def test_fsdp_moves_weights_not_activations(compiled, name):
  """ZeRO-3: per step the collectives move weight- and gradient-sized bytes (the f32 weights
  gathered for the forward and again for the backward, the gradients reduced: about 3x the
  parameter bytes), the same at 2 and at 8 sequences per device. Before activations were laid
  out, the residual stream was carried as [whole batch, L, D/8] and all-reduced: 4x the bytes
  at 4x the batch."""
  small, large = compiled(name, SMALL), compiled(name, LARGE)
  assert _collective_bytes(large) == pytest.approx(_collective_bytes(small), rel=0.02)
  assert 1.5 * _param_bytes() < _collective_bytes(large) < 4 * _param_bytes()


def test_fsdp_temporaries_are_those_of_local_tokens(compiled):
  """FSDP's temporaries are data parallelism's (each device holds its own sequences' activations;
  weights arrive one layer at a time), not the whole batch's."""
  for batch in (SMALL, LARGE):
    assert compiled("fsdp8", batch)["temp_bytes"] <= 1.05 * compiled("data8", batch)["temp_bytes"]
  # With remat the residuals are recomputed: fewer temporaries than without.
  assert compiled("fsdp8_remat", LARGE)["temp_bytes"] < compiled("fsdp8", LARGE)["temp_bytes"]


@pytest.mark.parametrize("name, shards", [("data8", 1), ("fsdp8", 8), ("fsdp4_tensor2", 8),
                                          ("data2_fsdp2_tensor2", 4)])
def test_argument_bytes_fall_with_the_parameter_shards(compiled, name, shards):
  """Parameters and both AdamW moments are split over fsdp x tensor (the QK-norm scales and
  norm vectors, a few KB, stay whole along tensor)."""
  r = compiled(name, SMALL)
  assert r["param_bytes"] == pytest.approx(_param_bytes() / shards, rel=0.01)
  assert r["optimizer_bytes"] == pytest.approx(2 * r["param_bytes"], rel=0.01)


@pytest.mark.parametrize("name", ["fsdp4_tensor2", "data2_fsdp2_tensor2"])
def test_only_tensor_parallel_traffic_grows_with_tokens(compiled, name):
  """Megatron tensor parallelism all-reduces activations: a few [tokens, D] per layer and
  direction, growing with each device's tokens; the weight gathers do not grow."""
  small, large = compiled(name, SMALL), compiled(name, LARGE)
  gathers = ("all-gather",)
  assert _collective_bytes(large, gathers) < 1.2 * _collective_bytes(small, gathers)
  m = tiny_config(**SHAPE).model
  data_shards = 8 // MESHES[name]["mesh.tensor"]
  added_tokens = (LARGE - SMALL) * 8 // data_shards * 256 * MESHES[name]["mesh.tensor"]
  per_token_layer = (_collective_bytes(large) - _collective_bytes(small)) / added_tokens / (
      m.num_layers * m.d_model * 4)
  assert 1 <= per_token_layer <= 8, per_token_layer


@pytest.mark.parametrize("name", ["fsdp4_tensor2_remat", "data2_fsdp2_tensor2_remat"])
def test_tensor_meshes_with_remat(compiled, name):
  """Tensor parallelism with full remat: collective bytes are affine in the tokens per device.
  Their part that does not grow with the batch (the line's value at zero tokens) is ZeRO-3's
  weights and gradients, between 1 and 3 times the parameter bytes (tensor halves each device's
  share), and the weight gathers themselves hardly grow; what grows is the activations'
  all-reduce, a few [tokens, D] per layer (the recomputed forward adds its own). Temporaries
  grow with the tokens a device holds (twice fsdp=8's at tensor=2: a device works on its data
  shard's sequences), not with the batch (8 times)."""
  small, large = compiled(name, SMALL), compiled(name, LARGE)
  gathers = ("all-gather",)
  assert _collective_bytes(large, gathers) < 1.2 * _collective_bytes(small, gathers)
  growth = _collective_bytes(large) - _collective_bytes(small)
  fixed = _collective_bytes(small) - growth * SMALL / (LARGE - SMALL)
  assert 1 * _param_bytes() < fixed < 3 * _param_bytes(), fixed / _param_bytes()
  m = tiny_config(**SHAPE).model
  tensor = MESHES[name]["mesh.tensor"]
  added_tokens = (LARGE - SMALL) * 8 // (8 // tensor) * 256 * tensor
  per_token_layer = growth / added_tokens / (m.num_layers * m.d_model * 4)
  assert 1 <= per_token_layer <= 8, per_token_layer
  fsdp_growth = (compiled("fsdp8_remat", LARGE)["temp_bytes"]
                 - compiled("fsdp8_remat", SMALL)["temp_bytes"])
  temp_growth = large["temp_bytes"] - small["temp_bytes"]
  assert temp_growth <= 1.1 * tensor * fsdp_growth, temp_growth / fsdp_growth


def test_microbatches_lower_the_peak(compiled):
  """train.microbatches=4 at the same global batch: a quarter of the tokens' activations live at
  once, so temporaries fall (to well under half); the weights are gathered once per microbatch."""
  whole, parts = compiled("fsdp8", LARGE), compiled("fsdp8_microbatches4", LARGE)
  assert parts["temp_bytes"] < 0.5 * whole["temp_bytes"]
  assert parts["peak_bytes"] < whole["peak_bytes"]
  gathers = ("all-gather",)
  assert _collective_bytes(parts, gathers) == pytest.approx(4 * _collective_bytes(whole, gathers),
                                                          rel=0.02)


def test_the_head_gradient_is_reduced_once_per_step(compiled):
  """The fused loss keeps each device's partial head gradient through its chunk loop and
  reduces it once: 8 chunks of 32 positions reduce what 2 chunks of 128 do. Summed across
  devices chunk by chunk (before), each extra chunk cost a [D, V] f32 reduction."""
  reductions = ("all-reduce", "reduce-scatter")
  few, many = compiled("fsdp8_chunk128", SMALL), compiled("fsdp8_chunk32", SMALL)
  head_gradient_bytes = 512 * 4096 * 4
  extra = _collective_bytes(many, reductions) - _collective_bytes(few, reductions)
  assert abs(extra) < 0.1 * head_gradient_bytes, extra


def test_sequence_parallelism_splits_the_residual_stream(compiled):
  """mesh.sequence_parallel: the residual stream and norms between the blocks are split along
  positions over tensor, so their activations take less memory; parameters are laid out as
  without it. (That the all-reduces become reduce-scatters is checked on a TPU target in
  test_compile.py: XLA:CPU keeps all-reduces.)"""
  plain, split = compiled("fsdp4_tensor2", LARGE), compiled("fsdp4_tensor2_sp", LARGE)
  assert split["temp_bytes"] < 0.95 * plain["temp_bytes"]
  assert split["param_bytes"] == plain["param_bytes"]


def test_tensor_parallelism_splits_the_vit_by_heads(compiled):
  """Late fusion at tensor=2: each device projects whole heads' q, k and v, so nothing moves
  between the ViT's projection and its attention. With the projection's columns ordered
  [W, 3, H, E], a device's slice held other heads' q and k, and splitting them took
  all-to-alls and collective-permutes in every ViT layer (3.8 MiB per step at this shape)."""
  r = compiled("late_fsdp4_tensor2", SMALL)
  kinds = {c["kind"]: c["bytes"] for c in r["collectives"]}
  assert "all-to-all" not in kinds, kinds
  assert kinds.get("collective-permute", 0) < 0.01 * _collective_bytes(r), kinds
