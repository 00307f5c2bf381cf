"""A RecordSession sink that writes an Avro archive (schemas.ArchiveWriter)."""
from __future__ import annotations

from pathlib import Path

from schemas import ArchiveWriter


class ArchiveSink:
    """Opens the archive on the LogHeader, the first record a RecordSession writes."""

    def __init__(self, path: Path, codec: str = "deflate"):
        self.path, self.codec, self.writer = Path(path), codec, None

    def write(self, record: dict) -> None:
        if self.writer is None:
            self.writer = ArchiveWriter(self.path, record, codec=self.codec)
        else:
            self.writer.write(record)

    def commit(self) -> None:
        pass   # the archive is made durable (fsync) on close

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
