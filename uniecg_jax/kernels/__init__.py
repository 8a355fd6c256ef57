"""Hand-written CPU kernels behind XLA FFI, each with a pure-XLA fallback (see small_batch_matmul)."""
