"""calm_jax: Continuous Autoregressive Language Models (CALM) in JAX/Flax."""
