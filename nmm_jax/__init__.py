"""nmm_jax: pretraining native multimodal models with JAX/Flax NNX."""
import glob as _glob
import importlib.util as _importlib_util
import os as _os

__version__ = "0.1.0"


def tpu_chips_attached() -> bool:
  """Whether this machine holds TPU chips (a Cloud TPU VM: /dev/accel* on v4/v5p, /dev/vfio/N
  on v5e/v6e), whatever the environment says."""
  return bool(_glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"))


def _skip_absent_tpu():
  """With libtpu installed (the test extra has it, for compiling to TPUs) JAX's start-up on a
  machine without TPUs tries the TPU backend and prints alarming libtpu errors. Where no TPU chip
  is attached and nothing chose the platforms, JAX is pointed at the CPU before it starts.
  TPU VMs (chips under /dev/accel* or /dev/vfio/), GPU hosts (/dev/nvidia*) and an explicit
  JAX_PLATFORMS are left alone. nmm-compile's TPU and H100 targets need no attached chip."""
  if "JAX_PLATFORMS" in _os.environ or _os.environ.get("TPU_ACCELERATOR_TYPE"):
    return
  if tpu_chips_attached() or _glob.glob("/dev/nvidia[0-9]*"):
    return
  if _importlib_util.find_spec("libtpu") is None:
    return
  _os.environ["JAX_PLATFORMS"] = "cpu"


_skip_absent_tpu()
