"""Metrics via torchmetrics."""
