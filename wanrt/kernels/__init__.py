"""Triton kernels (one file per op family); filled in by the fused-kernel work."""
