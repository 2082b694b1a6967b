"""Late fusion: a ViT + connector, and the multi-layer fusion modes (input_concat, internal_add,
internal_xattn): they train, reduce to plain late fusion where they should, count right, and
the encoder's learning rate can be scaled or frozen."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import model_param_count, tiny_config
from nmm_jax import config as config_lib
from nmm_jax.data import pipeline
from nmm_jax.models import NMM
from nmm_jax.models.variables import abstract_model_state
from nmm_jax.scaling import flops
from nmm_jax.train.loop import train_and_evaluate
from nmm_jax.train.optimizer import make_optimizer

MODES = {
    "none": {},
    "input_concat": {"model.vision_layers": (1, -1)},
    "internal_add": {"model.vision_layers": (1, -1), "model.fusion_decoder_layers": (1,)},
    "internal_xattn": {"model.vision_layers": (0, 2, -1), "model.fusion_decoder_layers": (0, 1)},
}


def late_config(mode, **overrides):
  config = tiny_config(**{"model.fusion": "late", "model.vision_fusion": mode, **MODES[mode],
                          **overrides})
  config_lib.validate(config, jax.device_count())
  return config


@pytest.fixture(scope="module")
def batch(shapes_data_dir):
  b = next(iter(pipeline.make_dataset(tiny_config(), shapes_data_dir, "eval", seed=0)))
  b.pop("skipped")
  return b


@pytest.mark.parametrize("mode", list(MODES))
def test_param_count_matches_model(mode):
  cfg = late_config(mode).model
  assert flops.param_counts(cfg)["total"] == model_param_count(cfg)


def test_flops_hand_count():
  cfg = late_config("none").model  # encoder: width 64, 4 layers, mlp 256, 16 patches of 48
  encoder = 48 * 64 + 4 * (4 * 64 * 64 + 2 * 64 * 256)
  connector = 64 * 64 + 64 * 64
  assert flops.param_counts(cfg)["vision_matmul"] == encoder + connector
  extra = (flops.train_flops_per_sequence(cfg, 128, images_per_row=6)
           - flops.train_flops_per_sequence(cfg, 128))
  assert extra == 6 * (encoder + connector) * 6 * 16 + 12 * 4 * 16 ** 2 * 64 * 6


def test_input_concat_of_the_last_layer_is_plain_late_fusion(batch):
  plain = NMM(late_config("none").model, rngs=nnx.Rngs(0))
  concat = NMM(late_config("input_concat", **{"model.vision_layers": (-1,)}).model,
               rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(plain.logits(batch), concat.logits(batch))


def test_cross_attention_with_closed_gates_is_plain_late_fusion(batch):
  xattn = NMM(late_config("internal_xattn").model, rngs=nnx.Rngs(1))
  plain = NMM(late_config("none").model, rngs=nnx.Rngs(2))
  shared = nnx.state(xattn)
  del shared["fusion_blocks"]
  nnx.update(plain, shared)  # same encoder, connector and decoder weights
  np.testing.assert_allclose(xattn.logits(batch), plain.logits(batch), rtol=1e-5, atol=1e-5)
  for block in xattn.fusion_blocks:  # open the gates: the images now reach the text
    block.gate[...] = jnp.ones_like(block.gate[...])
  assert not np.allclose(xattn.logits(batch), plain.logits(batch), atol=1e-3)


def _first_updates(configs, batch) -> list:
  """The first optimizer update of each config (same weights: they differ in the encoder's
  learning rate and freezing only). Gradients run op by op; the optimizers are compiled
  together (op by op, they took 20 s)."""
  params = nnx.state(NMM(configs[0].model, rngs=nnx.Rngs(0)))

  def loss(params, graphdef):
    logits = nnx.merge(graphdef, params).logits(batch)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, batch["targets"][..., None], axis=-1)[..., 0])

  grads = [jax.grad(loss)(params, abstract_model_state(config.model)[0]) for config in configs]
  optimizers = [make_optimizer(config.train, config.model) for config in configs]
  return jax.jit(lambda grads, params: [tx.update(g, tx.init(params), params)[0]
                                        for tx, g in zip(optimizers, grads)])(grads, params)


def _grads(config, batch):
  graphdef, params = nnx.split(NMM(config.model, rngs=nnx.Rngs(0)))
  return jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p).logits(batch) ** 2)))(params)


@pytest.mark.parametrize("overrides", [{"model.remat": "full"}, {"model.scan_unroll": 4}])
def test_encoder_remat_and_unroll_keep_the_gradients(batch, overrides):
  """model.remat and model.scan_unroll reach the ViT's blocks too; gradients stay the same."""
  want = _grads(late_config("input_concat"), batch)
  got = _grads(late_config("input_concat", **overrides), batch)
  for g, w in zip(jax.tree.leaves(got["vision"]), jax.tree.leaves(want["vision"])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_encoder_learning_rate_scale_and_freeze(batch):
  full, half, frozen = _first_updates(
      [late_config("none"), late_config("none", **{"model.vision.lr_scale": 0.5}),
       late_config("none", **{"model.vision.freeze": True})], batch)
  for a, b in zip(jax.tree.leaves(full["vision"]), jax.tree.leaves(half["vision"])):
    np.testing.assert_allclose(b, 0.5 * a, rtol=1e-6, atol=1e-12)
  assert all(not np.any(u) for u in jax.tree.leaves(frozen["vision"]))
  assert any(np.any(u) for u in jax.tree.leaves(frozen["connector"]))
  for a, b in zip(jax.tree.leaves(full["decoder"]), jax.tree.leaves(half["decoder"])):
    np.testing.assert_array_equal(a, b)


# Not "none": input_concat of the last layer is plain late fusion
# (test_input_concat_of_the_last_layer_is_plain_late_fusion), and input_concat trains the same
# encoder and connector.
@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_each_fusion_mode_trains_on_the_embedded_data(mode, shapes_data_dir, tmp_path):
  config = late_config(mode, **{"train.steps": 12, "data.dir": shapes_data_dir,
                                "eval.every_steps": 100, "checkpoint.every_steps": 100})
  by_step = {r["step"]: r for r in train_and_evaluate(config, str(tmp_path))}
  assert by_step[12]["loss"] < by_step[1]["loss"] - 1.0
  assert by_step[12]["loss/caption"] < by_step[1]["loss/caption"] - 1.0


@pytest.mark.parametrize("overrides,key", [
    ({"model.vision_fusion": "internal_add", "model.vision_layers": (1, -1)},
     "model.fusion_decoder_layers"),
    ({"model.vision_fusion": "internal_xattn", "model.vision_layers": (-1,),
      "model.fusion_decoder_layers": ()}, "model.vision_layers"),
    ({"model.vision_layers": (1, 5)}, "model.vision_layers"),
    ({"model.fusion_decoder_layers": (0,)}, "model.fusion_decoder_layers"),
    ({"model.vision.num_patches": 64}, "model.vision.num_patches"),
    ({"model.vision_fusion": "sideways"}, "model.vision_fusion"),
])
def test_bad_late_fusion_configs_are_refused(overrides, key):
  config = tiny_config(**{"model.fusion": "late", **overrides})
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
    config_lib.validate(config, jax.device_count())
