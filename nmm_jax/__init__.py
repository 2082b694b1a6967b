"""nmm_jax: pretraining native multimodal models with JAX/Flax NNX."""
__version__ = "0.1.0"
