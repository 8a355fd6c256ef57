"""Serving a trained model: `decoding` (KV-cache prefill + on-device decode loop), `interpret`
(stage-1 ECG -> report), `chat` (the stage-2 unified model: interprets, or answers with `[ECG]`
tokens that become an ECG through the diffusion model)."""
