"""Checkpoints out of (and into) nmm_jax: safetensors, Hugging Face Qwen3/Llama folders.

run_checkpoint.py reads a run's saved config and parameters onto the host; safetensors_file.py
writes tensors one at a time; hf.py maps the text decoder to and from the Hugging Face layout;
`nmm-export` (__main__.py) is the command.
"""
