"""train.xla_flags: the compiler flag presets reach the environment without overriding a user's
own flags, and the pinned jaxlib and libtpu accept every one of them (an unknown flag stops a
backend at start-up, so a preset flag that a JAX upgrade dropped would end every run)."""
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from nmm_jax import config as config_lib
from nmm_jax import xla_flags

# Starts the CPU backend (XLA_FLAGS), then libtpu's compiler (LIBTPU_INIT_ARGS) through a
# compile-only v5p chip, and compiles a small program for it.
_START_BACKENDS = """
import jax, jax.numpy as jnp
jax.devices()
from nmm_jax.compile import topologies
device = topologies.target("v5p-8").devices[0]
x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16,
                         sharding=jax.sharding.SingleDeviceSharding(device))
with topologies.quiet_stderr():
  jax.jit(lambda a: a @ a).lower(x).compile()
print("started")
"""


def _start_backends(environ):
  env = {k: v for k, v in environ.items()}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-c", _START_BACKENDS], env=env, capture_output=True,
                        text=True, timeout=300)


def test_a_users_flags_win():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                          "--xla_gpu_enable_latency_hiding_scheduler=false",
             "LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_collective_fusion=false"}
  xla_flags.apply("auto", environ)
  gpu, tpu = environ["XLA_FLAGS"].split(), environ["LIBTPU_INIT_ARGS"].split()
  assert gpu[:2] == ["--xla_force_host_platform_device_count=8",
                     "--xla_gpu_enable_latency_hiding_scheduler=false"]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in gpu
  assert "--xla_tpu_enable_async_collective_fusion=true" not in tpu
  assert len(gpu) == 1 + len(xla_flags.GPU_FLAGS) and len(tpu) == len(xla_flags.TPU_FLAGS)
  again = dict(environ)
  xla_flags.apply("auto", again)  # idempotent: applying twice adds nothing
  assert again == environ


def test_none_leaves_the_environment_alone_and_bad_presets_are_refused():
  environ = {"XLA_FLAGS": "--xla_dump_to=somewhere"}
  xla_flags.apply("none", environ)
  assert environ == {"XLA_FLAGS": "--xla_dump_to=somewhere"}
  with pytest.raises(ValueError, match="train.xla_flags"):
    xla_flags.apply("fast", environ)
  with pytest.raises(config_lib.ConfigError, match="train.xla_flags"):
    config_lib.validate(tiny_config(**{"train.xla_flags": "fast"}), 8)


def test_jaxlib_and_libtpu_accept_every_preset_flag():
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
  xla_flags.apply("auto", environ)
  result = _start_backends(environ)
  assert result.returncode == 0 and "started" in result.stdout, result.stderr[-3000:]
  # The check is real: one flag libtpu does not know stops it (its message is among the
  # start-up lines quiet_stderr hides).
  environ["LIBTPU_INIT_ARGS"] += " --xla_tpu_no_such_flag=true"
  result = _start_backends(environ)
  assert result.returncode != 0 and "started" not in result.stdout
