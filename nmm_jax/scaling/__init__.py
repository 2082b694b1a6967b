"""Scaling-law tooling: parameter/FLOP accounting (flops.py)."""
