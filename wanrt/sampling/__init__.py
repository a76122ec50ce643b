"""Flow-matching schedulers and the denoising loop."""
