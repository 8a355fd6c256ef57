"""Reusable Flax (linen) layers shared by the LLM, the ECG encoder and the diffusion UNet.

- `linear`: `DenseGeneral` / `matmul` with separate param and compute dtypes and f32 accumulation.
- `norms`: `RMSNorm`.
- `rope`: rotary position embeddings with Hugging Face's rope-scaling variants.
- `attention`: grouped-query attention with causal + padding masks and an explicit KV cache.
- `mlp`: SwiGLU feed-forward block.
"""
from uniecg_jax.layers.linear import DenseGeneral, matmul, to_dtype  # noqa: F401
from uniecg_jax.layers.norms import RMSNorm  # noqa: F401
