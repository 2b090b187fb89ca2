"""Datamodules, datasets, transforms and the latent cache."""
