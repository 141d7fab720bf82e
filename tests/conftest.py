"""Shared test setup: 8 simulated CPU devices (before jax is imported) and small fixtures."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
