"""The log format: every record through Kafka messages and archives, sizes, errors,
truncation, and schema evolution against the released history."""

import io
import json
import random
import shutil

import fastavro
import pytest

import schemas
from schemas import (
    ArchiveReader,
    ArchiveWriter,
    CorruptRecordError,
    InvalidRecordError,
    NotAnArchiveError,
    SchemaCatalog,
    TruncatedArchiveError,
    UnknownSchemaError,
    decode_message,
    encode_message,
    read_archive,
)
from schemas.bench import bench_codec
from schemas.codec import HISTORY_DIR, SCHEMA_DIR

U64_MAX = 2**64 - 1
I64_MAX = 2**63 - 1


def typical_events():
    return [
        {"kind": "Interrupt", "icount": 1_000_000_000, "rip": 0x101000, "vector": 32},
        {"kind": "Dma", "icount": 1_000_000_100, "rip": 0x101004, "gpa": 0x200000,
         "data": b"GET key\n"},
        {"kind": "Interrupt", "icount": 1_000_000_100, "rip": 0x101004, "vector": 33},
        {"kind": "PortIn", "icount": 1_000_000_250, "rip": 0x101230, "port": 0x70, "size": 4,
         "value": 0x9ABCDEF0},
        {"kind": "MmioRead", "icount": 1_000_000_300, "rip": 0x101240, "gpa": 0xFEE00030,
         "size": 4, "value": 0x50014},
        {"kind": "Insn", "icount": 1_000_000_400, "rip": 0x101250, "opcode": 0x0F31,
         "rax": 0x12345678, "rdx": 0x9, "rcx": 0},
        {"kind": "Output", "icount": 1_000_000_500, "rip": 0x101260, "channel": 0, "seq": 17,
         "data": b"hello, world\n", "epoch": 0, "log_offset": -1},
        {"kind": "Checksum", "icount": 1_000_001_000, "rip": 0x101270,
         "state_hash": 0xDEADBEEFCAFEF00D, "regs": list(range(16)) + [0x101270, 0x2]},
        {"kind": "Heartbeat", "icount": 1_000_002_000, "wall_ns": 1_795_000_000_000_000_000},
        {"kind": "End", "icount": 1_000_003_000, "rip": 0x101300, "reason": "exited",
         "exit_code": 0, "state_hash": "ab" * 8, "outputs_sha256": "cd" * 32},
    ]


def extreme_events():
    """Every unsigned field at 2**64-1 (its top bit set), every count at its maximum."""
    return [
        {"kind": "Interrupt", "icount": I64_MAX, "rip": U64_MAX, "vector": 255},
        {"kind": "Dma", "icount": I64_MAX, "rip": U64_MAX, "gpa": U64_MAX, "data": bytes(2048)},
        {"kind": "PortIn", "icount": 0, "rip": 0, "port": 0xFFFF, "size": 4, "value": U64_MAX},
        {"kind": "MmioRead", "icount": I64_MAX, "rip": U64_MAX, "gpa": U64_MAX, "size": 8,
         "value": 2**63},
        {"kind": "Insn", "icount": I64_MAX, "rip": U64_MAX, "opcode": 0x0FC7, "rax": U64_MAX,
         "rdx": 2**63, "rcx": U64_MAX},
        {"kind": "Output", "icount": I64_MAX, "rip": U64_MAX, "channel": 1, "seq": I64_MAX,
         "data": b"", "epoch": I64_MAX, "log_offset": I64_MAX},
        {"kind": "Checksum", "icount": I64_MAX, "rip": U64_MAX, "state_hash": U64_MAX,
         "regs": [U64_MAX, 2**63] * 9},
        {"kind": "Heartbeat", "icount": I64_MAX, "wall_ns": I64_MAX},
        {"kind": "End", "icount": I64_MAX, "rip": U64_MAX, "reason": "stopped", "exit_code": -1,
         "state_hash": "f" * 16, "outputs_sha256": "0" * 64},
    ]


def header(**changes):
    return {"kind": "LogHeader", "format_version": schemas.FORMAT_VERSION, "vm_id": "vm1",
            "guest_name": "ticks", "guest_sha256": "0123456789abcdef" * 4,
            "memory_bytes": 64 << 20, "bootargs": "n=1000 seed=7", "counter": "fast",
            "icount_semantics": "x86-retired;rep=1+per-1KiB-chunk;kvm-insn-emulation-v1",
            "checksum_every": 1_000_000, "created_wall_ns": 1_795_000_000_123_456_789,
            "kvmrr_version": "0.1.0", "cpu_model": "kvmrr-x86-64-v1:0123456789abcdef",
            "guest_image": b"\x7fELF" + bytes(60), "epoch": 0, "machine": "kvmrr",
            "host_cpu": 0, "guest_image_deflated": b"", **changes}


def snapshot(blob=b"\x7fKVMRR-SNAPSHOT" + bytes(range(256)) * 40):
    return {"kind": "Snapshot", "icount": 999_999_000, "next_seq": 0,
            "guest_sha256": "0123456789abcdef" * 4, "chunk": 0, "chunks": 1, "blob": blob,
            "state_hash": "00ff" * 4, "log_offset": 42, "epoch": 3}


def batch(first_seq, events):
    return {"kind": "EventBatch", "first_seq": first_seq, "events": events,
            "next_input_offset": -1, "epoch": 2}


def archive_records():
    """A snapshot then 20 batches of every event kind, as a recorder would archive them."""
    records = [snapshot()]
    for i in range(20):
        records.append(batch(i * 10, typical_events()))
    return records


def write_archive(path, records, codec="deflate", flush_every=3):
    with ArchiveWriter(path, header(), codec=codec) as archive:
        for i, record in enumerate(records, 1):
            archive.write(record)
            if i % flush_every == 0:
                archive.flush()  # several blocks, so cuts land at block boundaries too


def read_all(path, **kwargs):
    head, records = read_archive(path, **kwargs)
    return head, list(records)


# ---- round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("events", [typical_events(), extreme_events()], ids=["typical", "max"])
def test_every_event_kind_round_trips_as_a_kafka_message(events):
    record = batch(12345, events)
    value, headers = encode_message(record)
    assert decode_message(value, headers) == record
    assert {event["kind"] for event in typical_events()} == set(schemas.EVENT_KINDS)


@pytest.mark.parametrize("record", [header(), snapshot(), snapshot(blob=b""),
                                    batch(0, []), batch(I64_MAX, [])],
                         ids=["header", "snapshot", "empty-snapshot", "empty-batch", "max-seq"])
def test_header_snapshot_and_batch_round_trip_as_kafka_messages(record):
    value, headers = encode_message(record)
    assert headers == [(schemas.SCHEMA_HEADER, schemas.CATALOG.fingerprint(record["kind"]))]
    assert decode_message(value, headers) == record
    assert decode_message(value, dict(headers)) == record  # headers as a dict work too


def test_unsigned_values_are_non_negative_ints_after_decoding():
    value, headers = encode_message(batch(0, extreme_events()))
    events = decode_message(value, headers)["events"]
    assert events[0]["rip"] == U64_MAX
    assert events[6]["regs"] == [U64_MAX, 2**63] * 9
    assert all(word >= 0 for event in events for name, word in event.items()
               if isinstance(word, int) and name != "exit_code")


@pytest.mark.parametrize("codec", schemas.ARCHIVE_CODECS)
@pytest.mark.parametrize("events", [typical_events(), extreme_events()], ids=["typical", "max"])
def test_every_event_kind_round_trips_through_an_archive(tmp_path, codec, events):
    records = [snapshot(), batch(0, events), batch(len(events), events[::-1]), batch(99, [])]
    write_archive(tmp_path / "run.avro", records, codec=codec)

    head, read = read_all(tmp_path / "run.avro")
    assert head == header()
    assert read == records
    with ArchiveReader(tmp_path / "run.avro") as reader:
        assert reader.codec == codec
        assert reader.header == header()
        assert list(reader) == records


def test_an_archive_is_a_plain_avro_container_other_tools_can_read(tmp_path):
    write_archive(tmp_path / "run.avro", archive_records())
    with open(tmp_path / "run.avro", "rb") as fo:
        names = [name for name, _ in fastavro.reader(fo, return_record_name=True)]
    assert names == (["kvmrr.LogHeader", "kvmrr.Snapshot"] + ["kvmrr.EventBatch"] * 20
                     + ["kvmrr.ArchiveEnd"])


def test_message_key_is_the_icount_big_endian():
    assert schemas.icount_key(0x0102) == b"\0\0\0\0\0\0\x01\x02"
    assert schemas.icount_from_key(schemas.icount_key(I64_MAX)) == I64_MAX


def test_snapshot_splits_into_kafka_chunks_and_joins_back():
    whole = snapshot()
    chunks = schemas.split_snapshot(whole, 1000)
    assert [(c["chunk"], c["chunks"]) for c in chunks] == [(i, 11) for i in range(11)]
    received = [decode_message(*encode_message(chunk)) for chunk in chunks]
    assert schemas.join_snapshot(received) == whole
    with pytest.raises(CorruptRecordError, match="does not belong"):
        schemas.join_snapshot(received[:5] + received[6:])
    other = schemas.split_snapshot(dict(whole, icount=5), 1000)
    with pytest.raises(CorruptRecordError, match="does not belong"):
        schemas.join_snapshot(received[:3] + other[3:])


# ---- size -----------------------------------------------------------------------------

def test_a_typical_interrupt_encodes_in_at_most_12_bytes():
    def value_size(count):
        events = [{"kind": "Interrupt", "icount": 1_000_000_000 + i, "rip": 0x101000,
                   "vector": 32} for i in range(count)]
        return len(encode_message(batch(1000, events))[0])

    per_event = (value_size(1000) - value_size(0)) / 1000
    assert per_event <= 12, per_event  # union branch 1 + icount 5 + rip 4 + vector 1


def test_bench_codec_reports_throughput_and_size():
    result = bench_codec(events=2000, batch_size=100)
    assert result["events_per_s"] > 0
    assert 11 <= result["bytes_per_interrupt"] <= 12


# ---- errors: messages -----------------------------------------------------------------

def test_an_unknown_fingerprint_is_refused_and_named_in_hex():
    value, _ = encode_message(batch(0, typical_events()))
    with pytest.raises(UnknownSchemaError, match="0011223344556677"):
        decode_message(value, [(schemas.SCHEMA_HEADER, bytes.fromhex("0011223344556677"))])


@pytest.mark.parametrize("headers", [None, [], [("other", b"x")], [(schemas.SCHEMA_HEADER, b"abc")],
                                     [(schemas.SCHEMA_HEADER, "a524e0ccdc070abd")]],
                         ids=["none", "empty", "absent", "short", "str"])
def test_a_message_without_a_usable_fingerprint_is_refused(headers):
    value, _ = encode_message(header())
    with pytest.raises(UnknownSchemaError):
        decode_message(value, headers)


def test_the_fingerprint_is_avros_crc64_little_endian():
    # The Avro spec's test vector for "null": 7195948357588979594.
    assert schemas.schema_fingerprint("null") == (7195948357588979594).to_bytes(8, "little")


def corruptions():
    value, _ = encode_message(batch(7, typical_events()))
    yield "cut", value[:-5]
    yield "trailing", value + b"\x00"
    yield "bad-union-branch", value[:3] + b"\x7e" + value[4:]  # branch 63 of 9
    yield "empty", b""
    yield "garbage", b"\xff" * 40


@pytest.mark.parametrize("corrupt", [c for _, c in corruptions()],
                         ids=[name for name, _ in corruptions()])
def test_undecodable_bytes_raise_corrupt_record_error(corrupt):
    _, headers = encode_message(batch(7, typical_events()))
    with pytest.raises(CorruptRecordError):
        decode_message(corrupt, headers)


def test_random_damage_decodes_or_raises_corrupt_record_error_never_anything_else():
    value, headers = encode_message(batch(7, typical_events()))
    rng = random.Random(1)
    for _ in range(2000):
        damaged = bytearray(value)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            decode_message(bytes(damaged[:rng.randint(1, len(damaged))]), headers)
        except CorruptRecordError:
            pass


@pytest.mark.parametrize("record, match", [
    ({"kind": "Interrupt", "icount": 1, "rip": 2, "vector": 3}, "kind"),
    ({"icount": 1}, "kind"),
    (batch(0, [{"kind": "Reboot", "icount": 1}]), "Reboot"),
    (batch(0, [{"kind": "Interrupt", "icount": 1, "rip": -1, "vector": 3}]), "unsigned"),
    (batch(0, [{"kind": "Interrupt", "icount": 1, "rip": 2**64, "vector": 3}]), "unsigned"),
    (batch(0, [{"kind": "Interrupt", "icount": 1, "vector": 3}]), "Interrupt|rip"),
    (batch(0, [{"kind": "Heartbeat", "icount": 2**63, "wall_ns": 0}]), "EventBatch"),
    (dict(header(), memory_bytes="64M"), "LogHeader"),
])
def test_records_that_do_not_fit_the_schema_are_refused(record, match):
    with pytest.raises(InvalidRecordError, match=match):
        encode_message(record)


# ---- errors: archives -----------------------------------------------------------------

@pytest.mark.parametrize("codec", schemas.ARCHIVE_CODECS)
def test_an_archive_cut_anywhere_yields_its_complete_records_then_says_truncated(tmp_path, codec):
    records = [snapshot(blob=b"state" * 20)] + [batch(i * 10, typical_events()) for i in range(4)]
    write_archive(tmp_path / "run.avro", records, codec=codec, flush_every=2)
    data = (tmp_path / "run.avro").read_bytes()
    with open(tmp_path / "run.avro", "rb") as fo:
        first_block = next(iter(fastavro.block_reader(fo))).offset
    # Every byte of the records; the container header (mostly the schema's JSON) sampled.
    sizes = sorted({*range(64), *range(64, first_block, 41), *range(first_block, len(data))})
    cut = tmp_path / "cut.avro"
    outcomes = set()
    for size in sizes:
        cut.write_bytes(data[:size])
        try:
            reader = ArchiveReader(cut)
        except NotAnArchiveError:
            assert size < 4, f"cut at {size}: only a cut inside the magic is not an archive"
            outcomes.add("not-an-archive")
            continue
        except TruncatedArchiveError as exc:
            assert exc.records == 0
            outcomes.add("header-cut")
            continue
        assert reader.header == header()
        delivered = []
        with pytest.raises(TruncatedArchiveError) as error:
            for record in reader:
                delivered.append(record)
        assert delivered == records[:len(delivered)], f"cut at {size}"
        assert error.value.records == 1 + len(delivered)
        outcomes.add("prefix" if delivered else "header-only")
    assert outcomes == {"not-an-archive", "header-cut", "header-only", "prefix"}
    cut.write_bytes(data)
    assert read_all(cut) == (header(), records)


def test_an_archive_whose_writer_died_reads_to_its_last_block_then_says_truncated(tmp_path):
    path = tmp_path / "run.avro"
    archive = ArchiveWriter(path, header(), codec="null")
    for record in archive_records()[:5]:
        archive.write(record)
    archive.flush()
    archive._file.close()  # the process died: no end marker
    head, records = read_archive(path)
    delivered = []
    with pytest.raises(TruncatedArchiveError, match="without its end marker"):
        for record in records:
            delivered.append(record)
    assert delivered == archive_records()[:5]


def test_a_file_that_is_not_avro_is_not_an_archive(tmp_path):
    (tmp_path / "empty.avro").write_bytes(b"")
    (tmp_path / "text.avro").write_text("icount,rip\n1,2\n")
    for name in ("empty.avro", "text.avro"):
        with pytest.raises(NotAnArchiveError, match="not an Avro container"):
            read_archive(tmp_path / name)


def test_an_avro_container_of_other_records_is_not_an_archive(tmp_path):
    other = {"type": "record", "name": "Weather", "fields": [{"name": "t", "type": "int"}]}
    with open(tmp_path / "weather.avro", "wb") as fo:
        fastavro.writer(fo, other, [{"t": 21}])
    with pytest.raises(NotAnArchiveError, match="Weather"):
        read_archive(tmp_path / "weather.avro")


@pytest.mark.parametrize("records, first", [
    ([("kvmrr.Snapshot", snapshot()), ("kvmrr.ArchiveEnd", {"records": 1})], "Snapshot"),
    ([("kvmrr.ArchiveEnd", {"records": 0})], "ArchiveEnd"),
])
def test_an_archive_must_start_with_its_log_header(tmp_path, records, first):
    with open(tmp_path / "headless.avro", "wb") as fo:
        fastavro.writer(fo, schemas.CATALOG.archive_schema, records)
    with pytest.raises(NotAnArchiveError, match=f"first record is a {first}"):
        read_archive(tmp_path / "headless.avro")


def test_records_after_the_end_marker_are_corrupt(tmp_path):
    with open(tmp_path / "run.avro", "wb") as fo:
        fastavro.writer(fo, schemas.CATALOG.archive_schema, [
            ("kvmrr.LogHeader", header()), ("kvmrr.ArchiveEnd", {"records": 1}),
            ("kvmrr.EventBatch", {"first_seq": 0, "events": []})])
    head, records = read_archive(tmp_path / "run.avro")
    with pytest.raises(CorruptRecordError, match="after the archive's end marker"):
        list(records)


def test_a_damaged_block_in_the_middle_is_corrupt_not_truncated(tmp_path):
    path = tmp_path / "run.avro"
    write_archive(path, archive_records(), codec="null")
    data = bytearray(path.read_bytes())
    with open(path, "rb") as fo:
        blocks = list(fastavro.block_reader(fo))
    middle = blocks[len(blocks) // 2]
    data[middle.offset + middle.size - 1] ^= 0xFF  # its sync marker
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match="corrupt block"):
        read_all(path)


def test_the_archive_writer_refuses_records_that_do_not_belong_and_stays_valid(tmp_path):
    path = tmp_path / "run.avro"
    with ArchiveWriter(path, header(), codec="null") as archive:
        with pytest.raises(InvalidRecordError):
            archive.write(header())
        with pytest.raises(InvalidRecordError, match="whole snapshots"):
            archive.write(schemas.split_snapshot(snapshot(), 100)[0])
        with pytest.raises(InvalidRecordError):  # fails halfway through the record
            archive.write(batch(0, typical_events()[:3] + [{"kind": "Interrupt", "icount": 1}]))
        archive.write(batch(0, typical_events()))
    assert read_all(path) == (header(), [batch(0, typical_events())])
    with pytest.raises(InvalidRecordError):
        ArchiveWriter(tmp_path / "other.avro", snapshot())


# ---- schema evolution -----------------------------------------------------------------

def test_every_current_schema_is_frozen_in_the_history():
    released = schemas.CATALOG.released_fingerprints()
    frozen = {schemas.schema_fingerprint(json.loads(path.read_text()))
              for path in HISTORY_DIR.glob("*.avsc")}
    for kind in schemas.MESSAGE_KINDS:
        fingerprint = schemas.CATALOG.fingerprint(kind)
        assert fingerprint in frozen, (
            f"the {kind} schema changed (fingerprint {fingerprint.hex()}): freeze it with "
            f"json.dumps(schemas.CATALOG.expanded_schema({kind!r}), indent=2) into "
            f"schemas/history/{kind}.vN.avsc, next to the versions already released")
        assert released[fingerprint] == kind


def example_values(schema, named):
    """Values of an Avro schema: one per union branch, so every branch gets exercised."""
    if isinstance(schema, list):
        values = []
        for branch in schema:
            for value in example_values(branch, named):
                record = named.get(branch) if isinstance(branch, str) else branch
                tagged = isinstance(record, dict) and record.get("type") == "record"
                full = f"{record['namespace']}.{record['name']}" if tagged else None
                values.append((full, value) if tagged else value)
        return values
    if isinstance(schema, str):
        primitives = {"int": 3, "long": 4, "string": "s", "bytes": b"b", "boolean": True}
        return [primitives[schema]] if schema in primitives else example_values(
            named[schema], named)
    if schema["type"] == "record":
        named[f"{schema['namespace']}.{schema['name']}"] = schema
        return [{field["name"]: example_values(field["type"], named)[0]
                 for field in schema["fields"]}]
    if schema["type"] == "array":
        return [example_values(schema["items"], named)]
    return example_values(schema["type"], named)


@pytest.mark.parametrize("path", sorted(HISTORY_DIR.glob("*.avsc")), ids=lambda p: p.name)
def test_every_released_schema_is_read_by_the_current_one(path):
    released = json.loads(path.read_text())
    datum = example_values(released, {})[0]
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(released, {}), datum)
    headers = [(schemas.SCHEMA_HEADER, schemas.schema_fingerprint(released))]
    record = decode_message(buf.getvalue(), headers)
    assert record["kind"] == released["name"]


@pytest.fixture
def next_release(tmp_path):
    """The schemas as the next release might change them: Interrupt gains a field with a
    default; the history is the real one, holding today's schemas as released."""
    schema_dir = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, schema_dir, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    interrupt = json.loads((schema_dir / "Interrupt.avsc").read_text())
    interrupt["fields"].append({"name": "vcpu", "type": "int", "default": 0,
                                "doc": "the vCPU the interrupt was injected into"})
    (schema_dir / "Interrupt.avsc").write_text(json.dumps(interrupt))
    return SchemaCatalog(schema_dir, HISTORY_DIR)


def test_a_newer_reader_reads_released_messages_with_the_default(next_release):
    value, headers = encode_message(batch(5, typical_events()))  # today's writer
    assert next_release.fingerprint("EventBatch") != headers[0][1]

    record = decode_message(value, headers, catalog=next_release)
    interrupts = [e for e in record["events"] if e["kind"] == "Interrupt"]
    assert interrupts and all(e["vcpu"] == 0 for e in interrupts)
    rest = [dict(e) for e in record["events"]]
    for event in rest:
        event.pop("vcpu", None)
    assert rest == typical_events()


def test_a_newer_reader_reads_released_archives_with_the_default(tmp_path, next_release):
    write_archive(tmp_path / "run.avro", [batch(0, typical_events())])
    head, records = read_all(tmp_path / "run.avro", catalog=next_release)
    assert head == header()
    assert records[0]["events"][0] == {**typical_events()[0], "vcpu": 0}


def test_an_older_reader_refuses_a_newer_writer_instead_of_guessing(next_release):
    newer = batch(5, [{**typical_events()[0], "vcpu": 1}])
    value, headers = encode_message(newer, catalog=next_release)
    assert decode_message(value, headers, catalog=next_release) == newer
    with pytest.raises(UnknownSchemaError, match=headers[0][1].hex()):
        decode_message(value, headers)


def test_a_registered_old_writer_without_a_defaulted_field_reads_with_the_default(next_release):
    """The old variant registered by hand (as a history file would), written, then read."""
    old = next_release.expanded_schema("EventBatch")
    interrupt = old["fields"][1]["type"]["items"][0]
    interrupt["fields"] = [f for f in interrupt["fields"] if f["name"] != "vcpu"]
    fingerprint = next_release.register(old)
    assert fingerprint == schemas.CATALOG.fingerprint("EventBatch")  # it is today's schema
    buf = io.BytesIO()
    datum = {"first_seq": 0, "events": [("kvmrr.Interrupt", typical_events()[0])]}
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old, {}), datum)
    record = decode_message(buf.getvalue(), [(schemas.SCHEMA_HEADER, fingerprint)],
                            catalog=next_release)
    assert record["events"] == [{**typical_events()[0], "vcpu": 0}]


def test_a_header_written_without_the_fields_added_later_reads_their_defaults():
    old = {k: v for k, v in header().items() if k not in ("cpu_model", "guest_image")}
    value, headers = schemas.encode_message(old)
    back = schemas.decode_message(value, headers)
    assert back["cpu_model"] == "" and back["guest_image"] == b""
