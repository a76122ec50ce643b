"""Model modules whose parameter names are the official Wan2.1 checkpoint keys."""
