"""store package (filled in by its issue)."""
