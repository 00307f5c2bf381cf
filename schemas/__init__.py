"""Avro schemas of the kvmrr log and the one codec that reads and writes them."""

from .codec import (
    ARCHIVE_CODECS,
    CATALOG,
    EVENT_KINDS,
    FORMAT_VERSION,
    MESSAGE_KINDS,
    SCHEMA_HEADER,
    ArchiveReader,
    ArchiveWriter,
    CorruptRecordError,
    InvalidRecordError,
    LogFormatError,
    NotAnArchiveError,
    SchemaCatalog,
    TruncatedArchiveError,
    UnknownSchemaError,
    decode_message,
    encode_message,
    icount_from_key,
    icount_key,
    join_snapshot,
    message_kind,
    read_archive,
    schema_fingerprint,
    split_snapshot,
)

__all__ = [
    "ARCHIVE_CODECS", "CATALOG", "EVENT_KINDS", "FORMAT_VERSION", "MESSAGE_KINDS",
    "SCHEMA_HEADER", "ArchiveReader", "ArchiveWriter", "CorruptRecordError",
    "InvalidRecordError", "LogFormatError", "NotAnArchiveError", "SchemaCatalog",
    "TruncatedArchiveError", "UnknownSchemaError", "decode_message", "encode_message",
    "icount_from_key", "icount_key", "join_snapshot", "message_kind", "read_archive", "schema_fingerprint",
    "split_snapshot",
]
