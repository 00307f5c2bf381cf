"""The one codec of the kvmrr log: Kafka message values and Avro archive files.

Records are plain dicts with a "kind" key naming the Avro record, e.g.
``{"kind": "Interrupt", "icount": 5, "rip": 0x100010, "vector": 32}`` inside
``{"kind": "EventBatch", "first_seq": 0, "events": [...]}``.

Schemas live one named type per file in ``schemas/*.avsc``.  Each top-level record
(LogHeader, Snapshot, EventBatch) is a Kafka message on its own: its writer schema's
CRC-64-AVRO fingerprint travels in the ``kvmrr-schema`` header, so a consumer knows the
kind and version of a value before decoding it, and changing one record's schema leaves
the others' fingerprints alone.  Every released writer schema is frozen, expanded, in
``schemas/history/``; a reader decodes any of them into the current schema by Avro
schema resolution, and refuses a fingerprint it does not know rather than guess.

An archive is an Avro object container file whose schema is the union of the top-level
records plus ArchiveEnd, a trailer the writer adds on close: a file cut at a block
boundary is still a valid container, and only the missing trailer tells it was cut.

Machine words (RIP, addresses, port/MMIO values, registers, hashes) are unsigned 64-bit
but Avro's long is signed: the schemas mark them ``{"type": "long", "logicalType":
"uint64"}``, and the codec maps them to and from two's complement at the boundary.
Other readers see the raw signed long, which is the same 64 bits.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import fastavro
from fastavro.read import LOGICAL_READERS, SchemaResolutionError
from fastavro.schema import fingerprint as _avro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.write import LOGICAL_WRITERS

SCHEMA_DIR = Path(__file__).resolve().parent
HISTORY_DIR = SCHEMA_DIR / "history"
NAMESPACE = "kvmrr"

#: Meaning of the records (LogHeader.format_version); their encoding is versioned by
#: schema fingerprints instead.  2: the state hash (Checksum, End) covers the x87, SSE
#: and AVX registers too (libkvmrr/src/hash.c), so a log of version 1 would not verify.
FORMAT_VERSION = 2

#: Kafka header carrying the value's writer-schema fingerprint (8 bytes, little-endian
#: CRC-64-AVRO, as in Avro's single-object encoding).
SCHEMA_HEADER = "kvmrr-schema"

MESSAGE_KINDS = ("LogHeader", "Snapshot", "EventBatch", "Ack", "Output", "Epoch")
ARCHIVE_KINDS = ("LogHeader", "Snapshot", "EventBatch", "ArchiveEnd")
ARCHIVE_CODECS = ("null", "deflate")

_AVRO_MAGIC = b"Obj\x01"
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


# ---- errors -------------------------------------------------------------------------

class LogFormatError(Exception):
    """Bytes or records that are not a valid kvmrr log."""


class UnknownSchemaError(LogFormatError):
    """The writer schema is not one this reader knows: refuse rather than guess."""


class CorruptRecordError(LogFormatError):
    """Bytes that do not decode under their writer schema."""


class NotAnArchiveError(LogFormatError):
    """A file that is not an Avro container holding a kvmrr archive."""


class TruncatedArchiveError(LogFormatError):
    """An archive cut short; every complete record before the cut was delivered."""

    def __init__(self, message: str, records: int):
        super().__init__(message)
        self.records = records  # records delivered before the cut, LogHeader included


class InvalidRecordError(LogFormatError, ValueError):
    """A record dict that cannot be encoded (unknown kind, missing field, out of range)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:200]}"


# ---- uint64 <-> Avro long -----------------------------------------------------------

_U64_LIMIT = 1 << 64
_I64_LIMIT = 1 << 63


def _write_uint64(value: int, schema: Any) -> int:
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"{value} is not an unsigned 64-bit value")
    return value - _U64_LIMIT if value >= _I64_LIMIT else value


def _read_uint64(value: int, writer_schema: Any, reader_schema: Any) -> int:
    return value + _U64_LIMIT if value < 0 else value


LOGICAL_WRITERS["long-uint64"] = _write_uint64
LOGICAL_READERS["long-uint64"] = _read_uint64


# ---- schemas ------------------------------------------------------------------------

def schema_fingerprint(schema: Any) -> bytes:
    """CRC-64-AVRO fingerprint of a schema's parsing canonical form, 8 bytes."""
    canonical = to_parsing_canonical_form(schema)
    return bytes.fromhex(_avro_fingerprint(canonical, "CRC-64-AVRO"))


def _load_definitions(schema_dir: Path) -> dict[str, dict]:
    definitions = {}
    for path in sorted(schema_dir.glob("*.avsc")):
        schema = json.loads(path.read_text())
        definitions[f"{schema['namespace']}.{schema['name']}"] = schema
    return definitions


def _expand(schema: Any, definitions: dict[str, dict], defined: set[str]) -> Any:
    """The schema with every named reference replaced by its definition at first use,
    as Avro requires of a self-contained schema (a writer schema, a history file)."""
    if isinstance(schema, list):
        return [_expand(branch, definitions, defined) for branch in schema]
    if isinstance(schema, str):
        if schema in _PRIMITIVES or schema in defined:
            return schema
        if schema not in definitions:
            raise LogFormatError(f"schema references unknown type {schema!r}")
        return _expand(definitions[schema], definitions, defined)
    kind = schema["type"]
    if kind == "record":
        defined.add(f"{schema.get('namespace', NAMESPACE)}.{schema['name']}")
        fields = [dict(field, type=_expand(field["type"], definitions, defined))
                  for field in schema["fields"]]
        return dict(schema, fields=fields)
    if kind == "array":
        return dict(schema, items=_expand(schema["items"], definitions, defined))
    if kind == "map":
        return dict(schema, values=_expand(schema["values"], definitions, defined))
    if kind in ("enum", "fixed"):
        defined.add(f"{schema.get('namespace', NAMESPACE)}.{schema['name']}")
    return schema


class SchemaCatalog:
    """The current schema of every record kind, plus every released writer schema by
    fingerprint.  Built once at import as CATALOG; tests build others to play a future
    schema change against the released history."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR, history_dir: Path | None = None):
        definitions = _load_definitions(Path(schema_dir))
        self._expanded = {kind: _expand(f"{NAMESPACE}.{kind}", definitions, set())
                          for kind in MESSAGE_KINDS}
        self._current = {kind: fastavro.parse_schema(self._expanded[kind], {})
                         for kind in MESSAGE_KINDS}
        self._fingerprints = {kind: schema_fingerprint(self._expanded[kind])
                              for kind in MESSAGE_KINDS}
        self._writers: dict[bytes, tuple[str, dict]] = {
            self._fingerprints[kind]: (kind, self._current[kind]) for kind in MESSAGE_KINDS}
        # One union, expanded as a whole so each named type is defined once.
        self.archive_schema = fastavro.parse_schema(
            _expand([f"{NAMESPACE}.{kind}" for kind in ARCHIVE_KINDS], definitions, set()), {})
        events = self._expanded["EventBatch"]["fields"][1]["type"]["items"]
        self.event_kinds = tuple(event["name"] for event in events)
        self.event_names = {kind: f"{NAMESPACE}.{kind}" for kind in self.event_kinds}
        for path in sorted(Path(history_dir or Path(schema_dir) / "history").glob("*.avsc")):
            self.register(json.loads(path.read_text()))

    def register(self, schema: dict) -> bytes:
        """Accept a released writer schema (self-contained, as in schemas/history/)."""
        kind = schema["name"].rpartition(".")[2]
        if kind not in MESSAGE_KINDS:
            raise LogFormatError(f"{schema['name']} is not a message record")
        fingerprint = schema_fingerprint(schema)
        self._writers.setdefault(fingerprint, (kind, fastavro.parse_schema(schema, {})))
        return fingerprint

    def fingerprint(self, kind: str) -> bytes:
        """Fingerprint of the current schema of a message kind."""
        return self._fingerprints[kind]

    def current_schema(self, kind: str) -> dict:
        """The current parsed schema of a message kind: writer of new records, reader of all."""
        return self._current[kind]

    def expanded_schema(self, kind: str) -> dict:
        """The current schema of a kind, self-contained, as a history file holds it."""
        return json.loads(json.dumps(self._expanded[kind]))

    def writer_schema(self, fingerprint: bytes) -> tuple[str, dict]:
        """(kind, parsed schema) of a released writer schema."""
        try:
            return self._writers[fingerprint]
        except KeyError:
            raise UnknownSchemaError(
                f"unknown writer schema fingerprint {fingerprint.hex()}: not a released "
                f"kvmrr schema, refusing to guess") from None

    def released_fingerprints(self) -> dict[bytes, str]:
        return {fingerprint: kind for fingerprint, (kind, _) in self._writers.items()}


CATALOG = SchemaCatalog()
EVENT_KINDS = CATALOG.event_kinds


# ---- records <-> Avro data ----------------------------------------------------------

def _record_kind(record: Any, allowed: Iterable[str]) -> str:
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind not in allowed:
        raise InvalidRecordError(f"record kind {kind!r} is not one of {', '.join(allowed)}")
    return kind


def _to_avro(kind: str, record: dict, catalog: SchemaCatalog) -> dict:
    """The datum fastavro writes.  Records carry their "kind" key along, which fastavro
    ignores, so only a batch's events need rewriting: into (union branch, event) tuples,
    which name the branch instead of letting fastavro guess it from the fields."""
    if kind != "EventBatch":
        return _with_defaults(kind, record, catalog)
    names = catalog.event_names
    try:
        events = [(names[event["kind"]], event) for event in record["events"]]
    except (KeyError, TypeError) as exc:
        raise InvalidRecordError(f"EventBatch events must be event dicts with a 'kind' of "
                                 f"{', '.join(names)}: {_one_line(exc)}") from None
    return {"first_seq": record.get("first_seq"), "events": events,
            "next_input_offset": record.get("next_input_offset", -1),
            "epoch": record.get("epoch", 0)}


def _with_defaults(kind: str, record: dict, catalog: SchemaCatalog) -> dict:
    """A record written without a field added later gets the field's default.  fastavro
    would write a bytes field's default as given, the JSON string Avro specifies, and fail
    on it: so defaults are filled here, bytes encoded as Avro says (ISO-8859-1)."""
    fields = catalog.current_schema(kind).get("fields", ())
    missing = [f for f in fields if f["name"] not in record and "default" in f]
    if not missing:
        return record
    filled = dict(record)
    for f in missing:
        default = f["default"]
        filled[f["name"]] = (default.encode("latin-1") if f["type"] == "bytes"
                             and isinstance(default, str) else default)
    return filled


def _from_avro(kind: str, datum: dict) -> dict:
    if kind == "EventBatch":
        datum["events"] = [{"kind": name.rpartition(".")[2], **fields}
                           for name, fields in datum["events"]]
    return {"kind": kind, **datum}


def _encode(schema: Any, kind: str, datum: Any) -> bytes:
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, schema, datum)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise InvalidRecordError(f"cannot encode {kind}: {_one_line(exc)}") from None
    return buf.getvalue()


# ---- Kafka messages -----------------------------------------------------------------

def encode_message(record: dict, *, catalog: SchemaCatalog = CATALOG
                   ) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A LogHeader, Snapshot or EventBatch as a Kafka message (value, headers)."""
    kind = _record_kind(record, MESSAGE_KINDS)
    value = _encode(catalog.current_schema(kind), kind, _to_avro(kind, record, catalog))
    return value, [(SCHEMA_HEADER, catalog.fingerprint(kind))]


def _schema_fingerprint_header(headers: Any) -> bytes:
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    found = [value for key, value in items if key == SCHEMA_HEADER]
    if len(found) != 1:
        raise UnknownSchemaError(f"message has {len(found)} {SCHEMA_HEADER!r} headers, "
                                 f"needs exactly one: refusing to guess its schema")
    fingerprint = bytes(found[0]) if isinstance(found[0], (bytes, bytearray, memoryview)) else b""
    if len(fingerprint) != 8:
        raise UnknownSchemaError(f"{SCHEMA_HEADER} header {found[0]!r} is not an "
                                 f"8-byte schema fingerprint")
    return fingerprint


def message_kind(headers: Any, *, catalog: SchemaCatalog = CATALOG) -> str:
    """The record kind of a Kafka message from its schema header alone, without decoding
    the value (a reader looking for one kind skips the others cheaply)."""
    return catalog.writer_schema(_schema_fingerprint_header(headers))[0]


def decode_message(value: bytes, headers: Any, *, catalog: SchemaCatalog = CATALOG) -> dict:
    """A Kafka message (value, headers as a list of (key, bytes) or a dict) as a record dict,
    resolved into the current schema of its kind."""
    fingerprint = _schema_fingerprint_header(headers)
    kind, writer = catalog.writer_schema(fingerprint)
    if not value:
        raise CorruptRecordError(f"empty {kind} message (schema {fingerprint.hex()})")
    buf = io.BytesIO(value)
    try:
        datum = fastavro.schemaless_reader(buf, writer, catalog.current_schema(kind),
                                           return_record_name=True)
    except SchemaResolutionError as exc:
        raise UnknownSchemaError(f"writer schema {fingerprint.hex()} cannot be read as the "
                                 f"current {kind}: {_one_line(exc)}") from None
    except Exception as exc:  # any failure to decode untrusted bytes is corruption
        raise CorruptRecordError(f"undecodable {kind} message ({len(value)} bytes, schema "
                                 f"{fingerprint.hex()}): {_one_line(exc)}") from None
    if buf.tell() != len(value):
        raise CorruptRecordError(f"{kind} message has {len(value) - buf.tell()} bytes after "
                                 f"its record (schema {fingerprint.hex()})")
    return _from_avro(kind, datum)


def icount_key(icount: int) -> bytes:
    """Kafka message key: the icount as 8-byte big-endian (docs/ARCHITECTURE.md §4.2)."""
    return icount.to_bytes(8, "big", signed=True)


def icount_from_key(key: bytes) -> int:
    return int.from_bytes(key, "big", signed=True)


# ---- snapshots in chunks ------------------------------------------------------------

def split_snapshot(snapshot: dict, max_chunk_bytes: int) -> list[dict]:
    """A one-chunk Snapshot record as Kafka-sized chunks of its blob."""
    blob = snapshot["blob"]
    starts = range(0, max(len(blob), 1), max_chunk_bytes)
    return [dict(snapshot, chunk=i, chunks=len(starts), blob=blob[start:start + max_chunk_bytes])
            for i, start in enumerate(starts)]


def join_snapshot(chunks: list[dict]) -> dict:
    """The chunks of one snapshot, in order, as one record with the whole blob."""
    first = chunks[0] if chunks else {}
    identity = ("icount", "next_seq", "guest_sha256", "state_hash")
    for i, chunk in enumerate(chunks):
        if (chunk.get("chunk"), chunk.get("chunks")) != (i, len(chunks)) or any(
                chunk.get(key) != first.get(key) for key in identity):
            raise CorruptRecordError(f"snapshot chunk {i} of {len(chunks)} does not belong: "
                                     f"chunk {chunk.get('chunk')}/{chunk.get('chunks')} at "
                                     f"icount {chunk.get('icount')}")
    if not chunks:
        raise CorruptRecordError("a snapshot needs at least one chunk")
    return dict(first, chunk=0, chunks=1, blob=b"".join(chunk["blob"] for chunk in chunks))


# ---- archives -----------------------------------------------------------------------

class ArchiveWriter:
    """Writes an archive: the LogHeader, then Snapshot and EventBatch records, then (on
    close) the ArchiveEnd trailer.  close() makes the file durable (fsync)."""

    def __init__(self, path: str | os.PathLike, header: dict, *, codec: str = "deflate",
                 catalog: SchemaCatalog = CATALOG):
        if codec not in ARCHIVE_CODECS:
            raise ValueError(f"archive codec {codec!r} is not one of {ARCHIVE_CODECS}")
        _record_kind(header, ("LogHeader",))
        self.path = Path(path)
        self._catalog = catalog
        self._records = 0
        self._file = open(self.path, "wb")
        try:
            self._writer = fastavro.write.Writer(self._file, catalog.archive_schema, codec=codec)
            self.write(header)
            self._writer.flush()  # the header is on disk before the first event
        except BaseException:
            self._file.close()
            raise

    def write(self, record: dict) -> None:
        kind = _record_kind(record, MESSAGE_KINDS if self._records == 0 else MESSAGE_KINDS[1:])
        if kind == "Snapshot" and (record.get("chunk"), record.get("chunks")) != (0, 1):
            raise InvalidRecordError("an archive holds whole snapshots (chunk 0 of 1); "
                                     "join_snapshot() the chunks first")
        datum = (f"{NAMESPACE}.{kind}", _to_avro(kind, record, self._catalog))
        # Encode once on the side: a record fastavro rejects halfway would leave a partial
        # record in the block it is filling.
        _encode(self._catalog.archive_schema, kind, datum)
        self._writer.write(datum)
        self._records += 1

    def flush(self) -> None:
        """End the current block and fsync: everything written so far survives a crash."""
        self._writer.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._writer.write((f"{NAMESPACE}.ArchiveEnd", {"records": self._records}))
            self.flush()
        finally:
            self._file.close()
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the new directory entry is durable too
        finally:
            os.close(directory)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class ArchiveReader:
    """Reads an archive: ``.header`` is its LogHeader; iterating yields the Snapshot and
    EventBatch records in order, resolved into the current schemas.  A cut archive yields
    every record of its complete blocks, then raises TruncatedArchiveError."""

    def __init__(self, path: str | os.PathLike, *, catalog: SchemaCatalog = CATALOG):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self._blocks = self._open_container(catalog)
            self._records = self._read_records()
            self.header = next(self._records)
        except BaseException:
            self._file.close()
            raise

    def _open_container(self, catalog: SchemaCatalog) -> Iterator[Any]:
        magic = self._file.read(len(_AVRO_MAGIC))
        if magic != _AVRO_MAGIC:
            what = "an empty file" if not magic else f"starts with {magic!r}"
            raise NotAnArchiveError(f"{self.path}: not an Avro container file ({what})")
        self._file.seek(0)
        try:
            blocks = fastavro.block_reader(self._file, catalog.archive_schema,
                                           return_record_name=True)
        except OSError:
            raise
        except Exception as exc:
            if self._at_end():
                raise TruncatedArchiveError(f"{self.path}: container header cut short at "
                                            f"byte {self._size}", 0) from None
            raise NotAnArchiveError(f"{self.path}: unreadable Avro container header: "
                                    f"{_one_line(exc)}") from None
        self.codec = blocks.codec
        writer = blocks.writer_schema
        names = ([branch.get("name") if isinstance(branch, dict) else branch
                  for branch in writer] if isinstance(writer, list) else None)
        known = {f"{NAMESPACE}.{kind}" for kind in ARCHIVE_KINDS}
        if not names or not set(names) <= known or f"{NAMESPACE}.LogHeader" not in names:
            shown = names or (writer.get("name") or writer.get("type")
                              if isinstance(writer, dict) else writer)
            raise NotAnArchiveError(f"{self.path}: Avro container of {shown}, not a kvmrr "
                                    f"archive")
        return iter(blocks)

    def _at_end(self) -> bool:
        return self._file.tell() >= self._size

    def _read_records(self) -> Iterator[dict]:
        try:
            yield from self._read_blocks()
        finally:
            self._file.close()

    def _read_blocks(self) -> Iterator[dict]:
        records, ended = 0, False
        while True:
            try:
                block = next(self._blocks)
            except StopIteration:
                break
            except OSError:
                raise
            except Exception as exc:
                if self._at_end() and not ended:
                    raise TruncatedArchiveError(
                        f"{self.path}: cut short at byte {self._size} after {records} "
                        f"records", records) from None
                raise CorruptRecordError(f"{self.path}: corrupt block after {records} "
                                         f"records: {_one_line(exc)}") from None
            try:
                data = list(block)  # a block whose sync marker matched: whole, not cut
            except SchemaResolutionError as exc:
                raise NotAnArchiveError(f"{self.path}: written with a schema this kvmrr "
                                        f"cannot read: {_one_line(exc)}") from None
            except Exception as exc:
                raise CorruptRecordError(f"{self.path}: undecodable block at byte "
                                         f"{block.offset}: {_one_line(exc)}") from None
            for name, datum in data:
                kind = name.rpartition(".")[2]
                if ended:
                    raise CorruptRecordError(f"{self.path}: {kind} record after the "
                                             f"archive's end marker")
                if records == 0 and kind != "LogHeader":
                    raise NotAnArchiveError(f"{self.path}: first record is a {kind}, not a "
                                            f"LogHeader")
                if kind == "ArchiveEnd":
                    if datum["records"] != records:
                        raise CorruptRecordError(
                            f"{self.path}: end marker counts {datum['records']} records, "
                            f"the archive holds {records}")
                    ended = True
                    continue
                if records > 0 and kind == "LogHeader":
                    raise CorruptRecordError(f"{self.path}: second LogHeader at record "
                                             f"{records}")
                records += 1
                yield _from_avro(kind, datum)
        if not ended:
            raise TruncatedArchiveError(
                f"{self.path}: ends after {records} records without its end marker (cut "
                f"short, or its writer never closed it)", records)

    def __iter__(self) -> Iterator[dict]:
        return self._records

    def close(self) -> None:
        self._records.close()
        self._file.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def read_archive(path: str | os.PathLike, *, catalog: SchemaCatalog = CATALOG
                 ) -> tuple[dict, Iterator[dict]]:
    """(header, records) of an archive; the file closes when the records run out."""
    reader = ArchiveReader(path, catalog=catalog)

    def records() -> Iterator[dict]:
        try:
            yield from reader
        finally:
            reader.close()

    return reader.header, records()
