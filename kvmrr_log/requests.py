"""The service's request lines, read one way everywhere (the gateway, the harness's client,
the FT harness): `<id> <command...>` in, `<id> <answer...>` out, as the kvstore guest
(guests/kvstore.c) reads and echoes them.

The id is the first space-delimited token after any leading spaces, 1..32 printable
non-space bytes (0x21-0x7e).  The guest answers a line without a usable id under the id
"-", which therefore names no request.
"""
from __future__ import annotations

ID_MAX = 32          # the guest's ID_MAX
NO_ID = "-"          # the id of the guest's answer to a line without a usable id


def request_fields(line: bytes) -> tuple[bytes, bytes]:
    """(id, the rest after the space that ends it), as bytes: the gateway keys requests by
    the id's exact bytes, so ids that differ only in undecodable bytes stay apart."""
    rid, _, rest = line.rstrip(b"\r\n").lstrip(b" ").partition(b" ")
    return rid, rest


def request_id(line: bytes) -> str:
    """The id a request or response line starts with; "" when it has none."""
    return request_fields(line)[0].decode("ascii", "replace")


def split_request(line: bytes) -> tuple[str, str]:
    """(id, the rest after the spaces that follow it): "x-1 PUT k v" -> ("x-1", "PUT k v")."""
    text = line.rstrip(b"\r\n").lstrip(b" ").decode("ascii", "replace")
    rid, _, rest = text.partition(" ")
    return rid, rest.lstrip(" ")


def valid_id(rid: str) -> bool:
    """An id the guest echoes back (a request under any other is answered as "-")."""
    return (0 < len(rid) <= ID_MAX and rid != NO_ID
            and all(0x21 <= ord(ch) <= 0x7e for ch in rid))


def request_line(rid: str, command: str) -> bytes:
    """The line for request `rid`, without its newline."""
    if not valid_id(rid):
        raise ValueError(f"request id {rid!r}: 1..{ID_MAX} printable non-space characters")
    return f"{rid} {command}".encode()
