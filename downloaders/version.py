"""The project's name and version, as the User-Agent states them.

``setup.py`` reads `VERSION` from this file, so the installed distribution and the running code
agree without a look-up at start-up (``importlib.metadata.version`` scans every installed
distribution: about 12 ms of every command's and every helper process's start).
"""

from __future__ import annotations

__all__ = ["PROJECT", "VERSION"]

PROJECT = "twisted-streamer"
VERSION = "0.1.0"
