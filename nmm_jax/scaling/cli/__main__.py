"""nmm-scaling: scaling-law studies, from the sweep to the fitted law.

  nmm-scaling sweep --config=configs/scaling_tiny.py --out=runs/sweep [--run]   plan / run the runs
  nmm-scaling collect runs/sweep/* --out=runs.csv        N, D, C and final held-out losses per run
  nmm-scaling fit --csv=runs.csv [--target=loss] [--json]     L = E + A/N^alpha + B/D^beta
  nmm-scaling plot --csv=runs.csv --out=plots/            isoFLOP curves, frontier, loss vs compute
  nmm-scaling compare --family=early=a.csv --family=late=b.csv --out=plots/
                                                          families' laws and L*(C) at equal compute
  nmm-scaling params --family=configs/paper.py            parameter and FLOP counts of configs

`nmm-scaling COMMAND --help` lists a command's flags.
"""
from nmm_jax.subcommands import dispatch

COMMANDS = {
    "sweep": "nmm_jax.scaling.cli.sweep",
    "collect": "nmm_jax.scaling.cli.collect",
    "fit": "nmm_jax.scaling.cli.fit",
    "plot": "nmm_jax.scaling.cli.plot",
    "compare": "nmm_jax.scaling.cli.compare",
    "params": "nmm_jax.scaling.cli.params",
}


def run():
  dispatch("nmm-scaling", COMMANDS, __doc__)


if __name__ == "__main__":
  run()
