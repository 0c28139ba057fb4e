"""`serve --keep DIR`: each request's photos and answer written to a folder of its own, whole or not at all.

Without --keep nothing of a request is written anywhere: photos live in the request's memory only."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .upload import UploadedFile

_SUFFIX = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif",
           "image/bmp": ".bmp", "image/tiff": ".tif"}


def keep_request(keep_dir: Path, files: list[UploadedFile], answer: dict) -> Path:
    """Write the uploads (photo-01.jpg, ...; the browser's file names only in request.json) and the answer
    into keep_dir/<UTC time>-<random id>/, staged under a hidden name and renamed when complete."""
    keep_dir = Path(keep_dir)
    keep_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    final = keep_dir / f"{stamp}-{uuid.uuid4().hex[:8]}"
    staging = keep_dir / f".{final.name}.partial"
    staging.mkdir()
    try:
        listed = []
        for i, upload in enumerate(files, 1):
            path = staging / f"photo-{i:02d}{_SUFFIX.get(upload.content_type, '.bin')}"
            path.write_bytes(upload.data)
            listed.append({"file": path.name, "uploaded_as": upload.filename, "bytes": len(upload.data)})
        with open(staging / "request.json", "w", encoding="utf-8") as f:
            json.dump({"photos": listed, "answer": answer}, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
