"""Scaling-law tooling: accounting (flops.py), sweeps, collection, the fit and plots."""
