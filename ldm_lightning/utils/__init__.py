"""Small helpers for the entry points: instantiation, config printing, logging."""
