"""Checkpoint layouts: detection, key maps, lazy loading, tiny checkpoint writer."""
