"""Losses: the autoencoder's (reconstruction, LPIPS, adversarial, regulariser) and CLIP's
contrastive loss of the conditioner."""
