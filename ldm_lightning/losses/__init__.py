"""Autoencoder losses: reconstruction, LPIPS, adversarial, regulariser."""
