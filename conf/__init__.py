"""Hydra configs; this file lets an imported entry point find them."""
