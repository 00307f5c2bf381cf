"""Request ids scoped to the client that sent them (the gateway's side of issue 14).

A client's request id is only unique among that client's own requests.  The gateway puts
each request on kvmrr.<vm>.in under an id of its own, derived from the client's scope (who
the client is) and the client's id, so two clients using the same id never meet: neither
on .in, nor in the answers the gateway keeps.  The derived id is what the guest sees and
echoes on .out; the gateway swaps the client's own id back in before answering.

A scope is a string with a kind prefix, so that kinds cannot collide:

- `token:<name>`: a client that proved who it is with a token (`gateway --tokens FILE`);
- `name:<name>`: a client that declared a name without proof (no tokens file):
  unauthenticated, it only keeps honest clients apart;
- `conn:<gateway nonce>:<n>`: a connection that said no HELLO: its ids mean something on
  that connection alone, so a retry on a new connection is a new request.

The derived id is `g` and 24 base32 characters of a 120-bit BLAKE2b of scope and id: within
the guest's 1..32 printable bytes, and the same after a gateway restart (it finds the ids
already sent and answered on .in and .out).  The client's id bytes are hashed as they are:
ids that are not valid UTF-8 or ASCII stay distinct.
"""
from __future__ import annotations

import base64
import hashlib

ID_MAX = 64          # bytes of a client's request id
NAME_MAX = 64        # bytes of a client name


def scoped_request_id(scope: str, rid: bytes) -> bytes:
    """The id that goes on .in for the client scope's request id rid."""
    h = hashlib.blake2b(scope.encode() + b"\0" + rid, digest_size=15,
                        person=b"kvmrr-request").digest()
    return b"g" + base64.b32encode(h).lower()


def declared_scope(name: str) -> str:
    """The scope of a client that said `HELLO <name>` to a gateway without a tokens file."""
    return f"name:{name}"


def token_scope(name: str) -> str:
    """The scope of a client whose token names it `name` in the gateway's tokens file."""
    return f"token:{name}"


def valid_name(name: bytes) -> bool:
    """1..NAME_MAX printable ASCII bytes, no space."""
    return 0 < len(name) <= NAME_MAX and all(0x21 <= b <= 0x7e for b in name)
