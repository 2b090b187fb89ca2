"""Lightning callbacks: EMA, image logging, FID."""
