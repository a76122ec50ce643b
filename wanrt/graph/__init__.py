"""Graph capture (CUDA graphs) and engine export; filled in by the fast-loop work."""
