"""Bad configs fail at once, before any compile, with a message naming the key."""
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from nmm_jax.config import ConfigError, validate
from nmm_jax.sharding import DEFAULT_SHARDING_RULES, batch_axes

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("overrides, key", [
    ({"train.steps": -5}, "config.train.steps"),
    ({"train.steps": 0}, "config.train.steps"),
    ({"model.fusion": "middle"}, "config.model.fusion"),
    ({"mesh.data": 3}, "config.mesh"),
    ({"mesh.data": 3, "mesh.fsdp": -1}, "config.mesh.fsdp"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "config.mesh"),
    ({"train.batch_size": 12}, "config.train.batch_size"),
    ({"model.num_kv_heads": 3}, "config.model.num_kv_heads"),
    ({"mesh.data": 2, "mesh.tensor": 4, "model.num_kv_heads": 2}, "config.model.num_kv_heads"),
    ({"model.remat": "sometimes"}, "config.model.remat"),
    ({"model.scan_unroll": 0}, "config.model.scan_unroll"),
    ({"model.scan_unroll": -2}, "config.model.scan_unroll"),
    ({"train.schedule": "linear"}, "config.train.schedule"),
    ({"data.image_size": 18}, "config.data.image_size"),
    ({"data.mixture": {"caption": -1.0}}, "config.data.mixture"),
    ({"data.augment.crop_scale": (0.0, 1.0)}, "config.data.augment.crop_scale"),
    ({"data.augment.flip_prob": 1.5}, "config.data.augment.flip_prob"),
    ({"model.moe.num_experts": -1}, "config.model.moe.num_experts"),
    ({"eval.captions": -1}, "config.eval.captions"),
    ({"eval.show_captions": -2}, "config.eval.show_captions"),
    ({"eval.max_new_tokens": 0}, "config.eval.max_new_tokens"),
    ({"model.param_dtype": "bfloat16"}, "config.model.param_dtype"),
    ({"model.dtype": "float16"}, "config.model.dtype"),
    ({"sharding_rules": (("batch", "replica"),)}, "config.sharding_rules"),
    ({"sharding_rules": (("batch",),)}, "config.sharding_rules"),
    ({"mesh.dcn_data": 3}, "config.mesh.dcn_data"),
    ({"train.profile_steps": (5, 2)}, "config.train.profile_steps"),
    ({"train.xla_flags": "fast"}, "config.train.xla_flags"),
    ({"model.attention": "splash"}, "config.model.attention"),
    ({"model.attention": "cudnn"}, "config.model.attention"),  # f32 compute
    ({"model.flash_block_q": 192}, "config.model.flash_block_q"),
    ({"model.flash_block_k": 64}, "config.model.flash_block_k"),
    ({"train.profile_steps": (1, 999)}, "config.train.profile_steps"),
    ({"mesh.data": 4, "mesh.fsdp": 2, "mesh.dcn_fsdp": 0}, "config.mesh.dcn_fsdp"),
    ({"model.fusion": "late", "model.vision.num_heads": 3}, "config.model.vision.num_heads"),
    ({"model.fusion": "late", "model.vision.head_dim": -8}, "config.model.vision.head_dim"),
])
def test_bad_value_names_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    validate(tiny_config(**overrides), num_devices=8)


def test_an_fsdp_axis_the_width_does_not_divide_names_the_fix():
  # 8 devices, d_model 36: shard over 4 and data-parallelise over 2.
  with pytest.raises(ConfigError, match=r"--config\.mesh\.fsdp=4 --config\.mesh\.data=-1"):
    validate(tiny_config(**{"mesh.data": 1, "mesh.fsdp": -1, "model.d_model": 36}), 8)
  assert validate(tiny_config(**{"mesh.data": -1, "mesh.fsdp": 4, "model.d_model": 36}), 8) == \
      dict(data=2, fsdp=4, tensor=1, expert=1)


def test_good_config_resolves_mesh():
  assert validate(tiny_config(), 8) == dict(data=8, fsdp=1, tensor=1, expert=1)
  assert validate(tiny_config(**{"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 2}), 8) == \
      dict(data=2, fsdp=2, tensor=2, expert=1)


def test_batch_divisibility_follows_the_rules_batch_axes():
  """The batch must divide over the mesh axes the rules give "batch" (sharding.batch_axes), the
  same axes batch_sharding and the MoE layer's token split use."""
  mesh = {"mesh.data": 2, "mesh.fsdp": 4}
  with pytest.raises(ConfigError, match=r"data\*fsdp\*expert = 8"):
    validate(tiny_config(**mesh, **{"train.batch_size": 4}), 8)
  rules = (("batch", "data"),) + tuple(r for r in DEFAULT_SHARDING_RULES if r[0] != "batch")
  validate(tiny_config(**mesh, **{"train.batch_size": 4, "sharding_rules": rules}), 8)
  assert batch_axes(rules) == ("data",)
  assert batch_axes(DEFAULT_SHARDING_RULES) == ("data", "fsdp", "expert")


def _train_cli(tmp_path, *flags):
  return subprocess.run(
      [sys.executable, "-m", "nmm_jax.train", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_key(tmp_path):
  result = _train_cli(tmp_path, "--config.train.stepz=10")
  assert result.returncode != 0
  assert "stepz" in result.stderr


def test_cli_rejects_bad_value_before_building_anything(tmp_path):
  result = _train_cli(tmp_path, "--config.train.steps=-1")
  assert result.returncode != 0
  assert "config.train.steps: must be a positive integer, got -1" in result.stderr
  assert not os.path.exists(tmp_path / "data")  # failed before data, model or compile


def test_a_config_saved_before_newer_keys_reads_their_defaults():
  """Export and scaling read runs saved by older versions: keys added since take defaults."""
  from nmm_jax.config import from_saved
  saved = tiny_config().to_dict()
  del saved["model"]["attention"], saved["mesh"]["sequence_parallel"]
  saved["train"]["steps"] = 7
  config = from_saved(saved)
  assert config.model.attention == "auto" and config.mesh.sequence_parallel is False
  assert config.train.steps == 7 and config.model.d_model == tiny_config().model.d_model
