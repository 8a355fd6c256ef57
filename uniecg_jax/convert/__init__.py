"""Checkpoint conversion between Hugging Face formats and ours (`hf_llm`: Llama / Qwen2 decoders)."""
