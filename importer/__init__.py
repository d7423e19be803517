"""importer: decide what to fetch. Remotes (the black-box downloader factory), manifests, syncs.

Everything here takes plain values (remotes, a storage, a catalog) and returns Deferreds or
results; the command line that reads a configuration and runs the reactor is `streamer.cli`.
"""

from importer.importers import IImporter, PulpManifestImporter, load_importer_class
from importer.manifest import ManifestEntry, ManifestError, parse_manifest, validate_manifest
from importer.progress import IProgress, format_report, make_progress
from importer.remote import POLICIES, Remote, download_url, remote_for_url
from importer.sync import SyncError, SyncReport, run_bounded, sync_remote, sync_remotes

__all__ = [
    "POLICIES",
    "IImporter",
    "IProgress",
    "ManifestEntry",
    "ManifestError",
    "PulpManifestImporter",
    "Remote",
    "SyncError",
    "SyncReport",
    "download_url",
    "format_report",
    "load_importer_class",
    "make_progress",
    "parse_manifest",
    "remote_for_url",
    "run_bounded",
    "sync_remote",
    "sync_remotes",
    "validate_manifest",
]
