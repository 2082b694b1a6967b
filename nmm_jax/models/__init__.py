"""Model definitions: one concept per file (layers, attention, decoder, nmm)."""
from nmm_jax.models.nmm import NMM

__all__ = ["NMM"]
