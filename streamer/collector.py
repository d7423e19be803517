"""The cyclic garbage collector's settings for a process whose start-up is done.

One policy for the console commands (`streamer.cli`) and each process of the twistd service
(`streamer.service.StreamerService`, once ready), kept out of both so the service does not
import the command line to apply it.
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLD", "settle_imports"]

#: The cyclic collector's first threshold once a process settled (Python's own: 700). A sync
#: allocates and frees objects by the million, almost all of them freed by their reference
#: counts: at 700 the collector ran 47-58 times in a 2000-file sync and its helper (10-26 ms
#: in all, finding next to nothing); at this threshold, once at most. What cycles there are
#: still go, at most this many container objects later; peak memory is unchanged.
GC_THRESHOLD = 10_000


def settle_imports() -> None:
    """Imports are done: take every object made so far out of the cyclic collector's sight
    (`gc.freeze`) and raise its first threshold to `GC_THRESHOLD` (helper processes forked
    afterwards inherit both). A command calls it before its work; each process of the
    twistd service once it is ready (`streamer.service.StreamerService`). Each full
    collection during the command, and the ones Python runs as it exits, then skip the
    ~50,000 objects of the imports: about 0.1 s less at the exit of a sync here. Before
    forking helper processes, it also keeps the collector from touching (and so copying) the
    pages they share with this process."""
    gc.freeze()
    _first, *older = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *older)
