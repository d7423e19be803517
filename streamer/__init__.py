"""streamer package (filled in by its issue)."""
