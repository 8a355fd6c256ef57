"""uniecg_jax: UniECG in JAX/Flax — one model that interprets 12-lead ECGs and generates them from text."""

__version__ = "0.1.0"
