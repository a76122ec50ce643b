"""Small explicit cache state objects (VAE causal feature cache, step-skipping caches)."""
