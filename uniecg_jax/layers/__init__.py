"""Reusable Flax (linen) layers shared by every model (LLM, ECG encoder, alignment head, UNet, VAE,
ECG-CLIP); `models/` builds on these and imports nothing else of the package.

- `linear`: `DenseGeneral` / `Linear` (torch.nn.Linear) / `matmul` / `einsum` with separate param
  and compute dtypes and f32 accumulation.
- `conv`: `Conv1d`, `ConvTranspose1d` (channels-last, logical names on the kernels).
- `norms`: `RMSNorm`, `LayerNorm`, `GroupNorm`.
- `attention`: `bidirectional_attention` (the one non-causal softmax core), `MultiHeadAttention`
  (torch), and the LLM's causal grouped-query `Attention` with its KV cache.
- `rope`: rotary position embeddings with Hugging Face's rope-scaling variants.
- `mlp`: SwiGLU feed-forward block.
- `activations`: `mish`, and `constrain` (logical sharding of `[B, L, C]` activations).
- `params`: abstract parameter trees, host-side init, leaf names (`path_name`).
"""
from uniecg_jax.layers.linear import DenseGeneral, Linear, matmul, to_dtype  # noqa: F401
from uniecg_jax.layers.norms import GroupNorm, LayerNorm, RMSNorm  # noqa: F401
