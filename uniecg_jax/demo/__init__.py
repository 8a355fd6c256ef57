"""`uniecg demo`, one module per part: `stage1` (ECG -> text), `diffusion` (text -> ECG), `stage2`
(the unified model); `uniecg_jax/cli/demo.py` only sequences them."""
