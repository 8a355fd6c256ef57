"""Text-to-ECG latent diffusion (DiffuSETS design) above `models/`: schedule, samplers,
conditioning, pipeline."""
