"""ldm-lightning: PyTorch Lightning + Hydra experiment framework for latent diffusion."""
