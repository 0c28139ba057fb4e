"""Library versions and timestamps recorded in every manifest."""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("idia-engine", "torch", "open_clip_torch", "faiss-gpu", "faiss-cpu", "numpy", "lmdb", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
