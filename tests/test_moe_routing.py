"""MoE routing that learns from the loss: the routing weights (top-1 scaled by the router
probability, top-k renormalised or not), the loss gradient reaching the router, DeepSeek-V3's
bias balancing (the update, training, exact resume), shared experts and dense first layers."""
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import model_param_count, tiny_config
from nmm_jax import config as config_lib
from nmm_jax.data import pipeline
from nmm_jax.export.run_checkpoint import flat_params, open_run
from nmm_jax.models import NMM
from nmm_jax.models.layers import SwiGLU
from nmm_jax.models.moe import MoEMLP, update_router_bias
from nmm_jax.scaling import flops
from nmm_jax.train.loop import train_and_evaluate
from nmm_jax.train.loss import weighted_nll

D, F = 16, 32
BIAS = "decoder.blocks.mlp.router_bias_X"


def moe_cfg(**kw):
  base = config_lib.base_config().model.moe.to_dict()
  return ml_collections.ConfigDict({**base, "num_experts": 4, **kw})


def tokens(seed=0, b=2, l=12):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, l, D)), jnp.float32),
          jnp.asarray(rng.random((b, l)) < 0.4), jnp.ones((b, l), bool))


@pytest.mark.parametrize("top_k,normalize", [(1, True), (1, False), (2, True), (2, False)])
def test_routing_weights(top_k, normalize):
  """Top-1: the chosen expert's probability (Switch), whatever normalize_topk says; top-2: the
  two largest probabilities, renormalised to sum 1 only with normalize_topk."""
  moe = MoEMLP(D, F, moe_cfg(top_k=top_k, normalize_topk=normalize), param_dtype=jnp.float32,
               rngs=nnx.Rngs(0))
  x, is_image, _ = tokens()
  _, probs_NxX, ids_NxK, weights_NxK = moe.route(x.reshape(-1, D), is_image.reshape(-1))
  top = np.sort(np.asarray(probs_NxX), -1)[:, ::-1][:, :top_k]
  np.testing.assert_allclose(np.take_along_axis(np.asarray(probs_NxX), ids_NxK, -1), top)
  expected = top / top.sum(-1, keepdims=True) if top_k > 1 and normalize else top
  np.testing.assert_allclose(weights_NxK, expected, rtol=1e-6)
  assert (top_k == 1 or normalize) or np.all(np.asarray(weights_NxK).sum(-1) < 1)


def _relative_grads(config, batch):
  """|grad| / |param| of the LM loss alone (no auxiliary loss) for the routers and the experts'
  matrices of the first MoE layer."""
  model = NMM(config.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def lm_loss(params):
    m = nnx.merge(graphdef, params)
    hidden, _ = m.forward(batch)
    mask = batch["loss_mask"] / jnp.sum(batch["loss_mask"])
    return weighted_nll(hidden, m.head_weight_DxV(), batch["targets"], mask,
                        config.train.loss_chunk)[0]

  grads = flat_params(jax.grad(lm_loss)(params))
  values = flat_params(params)
  ratio = lambda name: float(np.linalg.norm(grads[name][0]) / np.linalg.norm(values[name][0]))
  return ratio("decoder.blocks.mlp.w_router_DxX"), ratio("decoder.blocks.mlp.w_up_XxDxF")


@pytest.mark.parametrize("routing", ["learned", "modality"])
def test_the_language_model_loss_trains_the_router(routing, shapes_data_dir):
  """Top-1 of 8: the router's relative gradient from the LM loss is within a factor of ten of
  the experts' (it was 2e-9 against 1e-2 when the top-1 weight was renormalised to 1)."""
  config = tiny_config(**{"model.moe.num_experts": 8, "model.moe.top_k": 1,
                          "model.moe.routing": routing})
  batch = next(iter(pipeline.make_dataset(config, shapes_data_dir, "train", seed=0)))
  batch.pop("skipped")
  router, experts = _relative_grads(config, {k: jnp.asarray(v) for k, v in batch.items()})
  assert experts > 1e-4
  assert router > 0.1 * experts, (router, experts)


def test_bias_update_moves_towards_balance():
  load_UxX = jnp.asarray([[10.0, 2.0, 3.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
  bias = update_router_bias(jnp.zeros((2, 4)), load_UxX, 0.01, "learned")
  np.testing.assert_allclose(bias, [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]])
  # Modality routing: each half against its own mean (image experts 0-1, text experts 2-3).
  bias = update_router_bias(jnp.zeros((1, 4)), jnp.asarray([[10.0, 6.0, 1.0, 3.0]]), 0.01,
                            "modality")
  np.testing.assert_allclose(bias, [[-0.01, 0.01, 0.01, -0.01]])


def test_the_bias_chooses_but_does_not_weigh():
  """A large bias on one expert makes every token choose it; the weight stays its probability
  and the modality split holds."""
  moe = MoEMLP(D, F, moe_cfg(top_k=1, balance="bias", routing="modality"),
               param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  moe.router_bias_X[...] = jnp.asarray([0.0, 5.0, 0.0, 0.0])
  x, is_image, _ = tokens()
  _, probs_NxX, ids_NxK, weights_NxK = moe.route(x.reshape(-1, D), is_image.reshape(-1))
  image = np.asarray(is_image.reshape(-1))
  assert np.all(np.asarray(ids_NxK[image, 0]) == 1)
  assert np.all(np.asarray(ids_NxK[~image, 0]) >= 2)
  np.testing.assert_allclose(weights_NxK[:, 0],
                             np.take_along_axis(np.asarray(probs_NxX), ids_NxK, -1)[:, 0])


def test_shared_expert_is_a_dense_mlp_beside_zeroed_experts():
  moe = MoEMLP(D, F, moe_cfg(top_k=2, num_shared_experts=2), param_dtype=jnp.float32,
               rngs=nnx.Rngs(0))
  dense = SwiGLU(D, 2 * F, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  for name in ("w_gate_DxF", "w_up_DxF", "w_down_FxD"):
    getattr(dense, name)[...] = getattr(moe.shared, name)[...]
  moe.w_down_XxFxD[...] = jnp.zeros_like(moe.w_down_XxFxD[...])
  x, is_image, valid = tokens()
  np.testing.assert_allclose(moe(x, is_image, valid)[0], dense(x), rtol=1e-5, atol=1e-6)


def test_dense_first_layers_and_shared_experts_counted(shapes_data_dir):
  """first_dense_layers=2 of 4 with 8 experts top-1 and a shared expert: the real model's
  parameter count is the counted one, and the statistics cover the 2 MoE layers."""
  swiglu, router = 3 * 64 * 128, 64 * 8
  over = {"model.num_layers": 4, "model.moe.num_experts": 8, "model.moe.first_dense_layers": 2,
          "model.moe.num_shared_experts": 1}
  cfg = tiny_config(**over).model
  dense = flops.param_counts(tiny_config(**{"model.num_layers": 4}).model)
  counts = flops.param_counts(cfg)
  assert counts["total"] == model_param_count(cfg)
  assert counts["total"] == dense["total"] + 2 * (8 * swiglu + router)
  # A token passes 1 routed + 1 shared expert where the dense model has one MLP: one more.
  assert counts["matmul"] == dense["matmul"] + 2 * (swiglu + router)
  model = NMM(cfg, rngs=nnx.Rngs(0))
  batch = next(iter(pipeline.make_dataset(tiny_config(), shapes_data_dir, "eval", seed=0)))
  batch.pop("skipped")
  _, stats = model.forward(batch)
  assert stats["dropped"].shape == (2,)


@pytest.mark.parametrize("overrides,key", [
    ({"model.moe.balance": "loss"}, "model.moe.balance"),
    ({"model.moe.num_shared_experts": -1}, "model.moe.num_shared_experts"),
    ({"model.moe.first_dense_layers": 2}, "model.moe.first_dense_layers"),  # = num_layers
    ({"model.num_layers": 4, "model.moe.every": 2, "model.moe.first_dense_layers": 1},
     "model.moe.first_dense_layers"),
    ({"model.moe.grouped_matmul": "cutlass"}, "model.moe.grouped_matmul"),
    ({"model.moe.exchange": "nccl"}, "model.moe.exchange"),
])
def test_bad_routing_configs_are_refused(overrides, key):
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
    config_lib.validate(tiny_config(**{"model.moe.num_experts": 4, **overrides}),
                        jax.device_count())


def test_bias_balancing_trains_and_resumes_exactly(shapes_data_dir, tmp_path):
  """balance="bias", 8 experts top-1 over mesh.expert=4: the biases move every step, by the
  update rate; a run resumed from step 4 reaches step 6 with the same losses and bit-identical
  biases as the uninterrupted one."""
  config = tiny_config(**{"model.moe.num_experts": 8, "model.moe.top_k": 1,
                          "model.moe.balance": "bias", "model.moe.bias_update_rate": 0.01,
                          "mesh.expert": 4, "train.steps": 6, "data.dir": shapes_data_dir,
                          "eval.every_steps": 100, "checkpoint.every_steps": 2})
  straight = tmp_path / "straight"
  records = train_and_evaluate(config, str(straight))
  biases = {step: flat_params(open_run(str(straight), step).params())[BIAS]
            for step in (2, 4, 6)}
  assert biases[2].shape == (2, 8)
  # Each step moves each bias by +-rate (or 0 at the mean): 2 steps apart, at most 2 rates.
  step = np.abs(biases[4] - biases[2])
  assert np.all(step <= 0.02 + 1e-6) and np.any(step > 0.015)

  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  (resumed / "metrics.jsonl").unlink()
  again = train_and_evaluate(config, str(resumed))
  assert [r["step"] for r in again] == [5, 6]
  assert [r["loss"] for r in again] == [r["loss"] for r in records[4:6]]
  np.testing.assert_array_equal(flat_params(open_run(str(resumed), 6).params())[BIAS],
                                biases[6])
