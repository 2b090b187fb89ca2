"""Plain torch modules (no Lightning, no Hydra): autoencoder nets, quantiser, UNet, attention."""
