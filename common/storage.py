"""The artifact store: a directory tree shared by the web and every worker, paths built from ids."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

COPY_CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredUpload:
    path: Path
    size: int
    sha256: str


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def model_dir(self, owner_id: uuid.UUID, name: str, version: int) -> str:
        return f"{owner_id}/{name}/v{version}"

    def batch_dir(self, owner_id: uuid.UUID, batch_id: uuid.UUID) -> str:
        return f"{owner_id}/batches/{batch_id}"

    def batch_chunk(self, owner_id: uuid.UUID, batch_id: uuid.UUID, index: int) -> str:
        return f"{self.batch_dir(owner_id, batch_id)}/chunks/{index:06d}.arrow"

    def path(self, relative: str) -> Path:
        """The absolute path of a stored artifact; refuses anything that escapes the root."""
        resolved = (self.root / relative).resolve()
        if self.root not in resolved.parents:
            raise ValueError(f"artifact path escapes the store: {relative!r}")
        return resolved

    @contextmanager
    def spooled_upload(self, stream: BinaryIO, limit: int) -> Iterator[StoredUpload]:
        """Stream an upload to a temp file under the store (so a later rename is atomic), hashing as it goes.

        The temp file is removed on exit unless it was moved away with `keep`.
        """
        tmp_dir = self.root / ".incoming"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir)
        path = Path(name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(COPY_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(limit)
                    digest.update(chunk)
                    out.write(chunk)
            yield StoredUpload(path, size, digest.hexdigest())
        finally:
            path.unlink(missing_ok=True)

    def keep(self, source: Path, relative: str) -> Path:
        """Move a finished file into place under `relative`, atomically."""
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return target

    def write_bytes(self, relative: str, data: bytes) -> Path:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def remove_tree(self, relative: str) -> None:
        shutil.rmtree(self.path(relative), ignore_errors=True)
