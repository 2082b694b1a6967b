"""One of several real processes of tests/test_data_multiprocess.py (a simulated host).

  python multiprocess_data_worker.py PORT PROCESS_ID NUM_PROCESSES DATA_DIR OUT_JSON

Joins the others through jax.distributed (gloo collectives on CPU, 4 devices per process), then
1. reads one eval pass and records a fingerprint of every document it saw;
2. assembles the first training batch into global arrays and checks that they hold every
   process's local rows, in process order;
3. sums skip counts over the processes.
"""
import hashlib
import importlib.util
import json
import os
import sys

import numpy as np

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def document_fingerprints(batch) -> list:
  """A hash of each packed document's tokens and pixels."""
  out = []
  for row in range(len(batch["tokens"])):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      at = seg == s
      ids = np.unique(batch["image_ids"][row][at & (batch["image_ids"][row] >= 0)])
      digest = hashlib.sha1(batch["tokens"][row][at].tobytes())
      for i in ids:
        digest.update(batch["images"][row, i].tobytes())
      out.append(digest.hexdigest())
  return out


def main():
  port, process_id, num_processes, data_dir, out_json = sys.argv[1:]
  # Set before JAX starts; the test's conftest (8 devices in one process) is not imported here.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  from jax.experimental import multihost_utils
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id),
                             initialization_timeout=120)
  from nmm_jax import config as config_lib
  from nmm_jax import sharding
  from nmm_jax.data import batch as batch_lib
  from nmm_jax.data import pipeline
  from nmm_jax.data.stages import sum_over_processes
  from nmm_jax.sharding import place_batch
  assert jax.device_count() == 4 * int(num_processes) and jax.local_device_count() == 4

  spec = importlib.util.spec_from_file_location("tiny_config_file", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.dir, config.train.batch_size = data_dir, 8
  fingerprints = []
  for batch in pipeline.make_dataset(config, data_dir, "eval", seed=0):
    batch.pop("skipped")
    fingerprints += document_fingerprints(batch)

  mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(mesh_shape)
  batch_sh = sharding.batch_shardings(batch_lib.ndims(), mesh, config.sharding_rules)
  local = next(iter(pipeline.make_dataset(config, data_dir, "train", seed=0)))
  local.pop("skipped")
  global_batch = place_batch(local, batch_sh)
  for key, value in local.items():
    assert global_batch[key].shape == (8,) + value.shape[1:], key
    every_local = multihost_utils.process_allgather(value)          # [processes, 8/P, ...]
    assembled = multihost_utils.process_allgather(global_batch[key], tiled=True)  # [8, ...]
    np.testing.assert_array_equal(assembled, np.concatenate(list(every_local)), err_msg=key)

  skipped = sum_over_processes({"empty": 1 + jax.process_index(), "bad_image": 2})
  with open(out_json, "w") as f:
    json.dump({"fingerprints": fingerprints, "skipped": skipped,
               "first_rows": local["tokens"][:, :8].tolist()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
