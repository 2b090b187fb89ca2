"""Plain torch modules (no Lightning, no Hydra): first stage (autoencoder
network, identity), quantiser, backbones (UNet, DiT), attention."""
