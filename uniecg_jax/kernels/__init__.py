"""Hand-written CPU kernels behind XLA FFI, each with a pure-XLA fallback (small_batch_matmul)."""
