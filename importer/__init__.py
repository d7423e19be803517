"""importer package (filled in by its issue)."""
