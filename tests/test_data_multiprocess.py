"""Host sharding with real processes: 2 simulated hosts on localhost (jax.distributed, gloo)."""
import collections
import json
import os
import socket
import subprocess
import sys

from conftest import tiny_config
from multiprocess_data_worker import document_fingerprints
from nmm_jax.data import pipeline

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_data_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_read_disjoint_records_and_assemble_the_global_batch(shapes_data_dir,
                                                                       tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  outs = [str(tmp_path / f"process{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), "2", shapes_data_dir,
                             outs[i]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL) for i in range(2)]
  for proc in procs:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
  results = [json.load(open(path)) for path in outs]

  # Every eval document is read by exactly one of the two hosts: together they see what one
  # host alone sees.
  config = tiny_config(**{"data.dir": shapes_data_dir, "train.batch_size": 8})
  alone = collections.Counter()
  for batch in pipeline.make_dataset(config, shapes_data_dir, "eval", seed=0):
    alone.update(document_fingerprints(batch))
  seen = [collections.Counter(r["fingerprints"]) for r in results]
  assert seen[0] + seen[1] == alone
  assert not [f for f in seen[0] & seen[1] if alone[f] == 1]
  assert min(sum(s.values()) for s in seen) > 0.4 * sum(alone.values())

  # Distinct local rows; skip counts summed over the hosts.
  assert results[0]["first_rows"] != results[1]["first_rows"]
  assert results[0]["skipped"] == results[1]["skipped"] == {"empty": 3, "bad_image": 4}
