"""The value a successful download fires with."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class DownloadResult:
    """What was downloaded: the url, ``size`` + digests, where the bytes are, response headers.

    ``path`` is None when the bytes went to a caller-supplied writer instead of a file.
    ``headers`` are the final response's ``twisted.web.http_headers.Headers`` (None for file://).
    """

    url: str
    artifact_attributes: dict[str, Any]
    path: str | None
    headers: Any = None
