"""nmm-scaling params: parameter and FLOP counts of configs, from scaling/flops.py.

  nmm-scaling params --config=configs/paper.py:early-932m [--config.model.d_model=...]
  nmm-scaling params --family=configs/paper.py

With --family, every config the file lists in SPECS (each passed to its get_config), beside
the counts in its REFERENCE_PARAMS where it gives one. Prints a Markdown table: total
parameters, active matmul parameters per token (N; MoE: top_k experts), the encoder's per patch
(N_v, late fusion), and training FLOPs per sequence (forward + backward, full image slots).
"""
from absl import flags
from ml_collections import config_flags

from nmm_jax import config as config_lib
from nmm_jax.scaling.param_table import load_family, markdown, row

config_flags.DEFINE_config_file("config", None, "One config file (FILE.py[:ARG]).",
                                lock_config=False)
flags.DEFINE_string("family", None, "A config file listing SPECS (and REFERENCE_PARAMS).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if bool(FLAGS.family) == bool(FLAGS.config):
    raise ValueError("give one of --config=FILE.py[:ARG] or --family=FILE.py")
  if FLAGS.family:
    specs, references, get_config = load_family(FLAGS.family)
    rows = []
    for spec in specs:
      config = get_config(spec)
      config_lib.validate(config, num_devices=1)
      rows.append(row(spec, config, references.get(spec)))
  else:
    config_lib.validate(FLAGS.config, num_devices=1)
    rows = [row(config_flags.get_config_filename(FLAGS["config"]), FLAGS.config)]
  print(markdown(rows))
