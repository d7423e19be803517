"""A sync's helper processes: other cores sharing an ``immediate`` sync's downloads.

`process` starts and ends them (`SyncHelpers`, `helper_count`), `protocol` is what they say
to each other (JSON lines over a socket pair), `handout` is the syncing process's end (which
file goes to which helper, and back), `child` is the helper's own side. ``python -m
importer.helpers FD`` runs a helper where it cannot be forked.
"""
