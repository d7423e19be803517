"""The twistd dropin: ``twistd -n streamer [--config FILE] [--listen ENDPOINT]``.

Kept free of heavy imports: twistd imports every dropin to list them, and `ServiceMaker`
imports ``streamer.tap`` only when this plugin is used.
"""

from twisted.application.service import ServiceMaker

streamer = ServiceMaker(
    "streamer",
    "streamer.tap",
    "Serve repository content: stored files from disk, lazy files streamed from upstream.",
    "streamer",
)
