"""importer: decide what to fetch. Remotes (the black-box downloader factory), manifests, syncs."""

from importer.importers import IImporter, PulpManifestImporter, load_importer_class
from importer.manifest import ManifestEntry, ManifestError, parse_manifest, validate_manifest
from importer.progress import IProgress, format_report, make_progress
from importer.remote import POLICIES, Remote
from importer.sync import SyncError, SyncReport, run_bounded, sync_remote

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
    "format_report",
    "load_importer_class",
    "make_progress",
    "parse_manifest",
    "run_bounded",
    "sync_remote",
    "validate_manifest",
]
