"""Text-to-ECG latent diffusion (DiffuSETS design): layers, schedule, conditioning, pipeline."""
