"""Request lines are read one way (kvmrr_log.requests) by the gateway, the harness's client
and the FT harness, as the kvstore guest reads them."""
import pytest

from kvmrr_log.requests import NO_ID, request_id, request_line, split_request, valid_id


@pytest.mark.parametrize("line, rid", [
    (b"c1-7 PUT k v", "c1-7"), (b"c1-7 OK t=5 v=00000001\n", "c1-7"),
    (b"  c1-7  GET k\r\n", "c1-7"),       # the guest skips leading spaces too
    (b"lonely", "lonely"), (b"", ""), (b"   \n", ""), (b"- ERR empty", NO_ID)])
def test_request_id_is_the_first_token(line, rid):
    assert request_id(line) == rid


def test_split_request_gives_the_command_after_the_id():
    assert split_request(b"c1-7 PUT k v\n") == ("c1-7", "PUT k v")
    assert split_request(b"c1-7   GET k") == ("c1-7", "GET k")
    assert split_request(b"c1-7") == ("c1-7", "")
    assert split_request(b"x OK v=0000000a hello") == ("x", "OK v=0000000a hello")


def test_valid_ids_are_what_the_guest_echoes():
    assert valid_id("c1-1") and valid_id("x" * 32) and valid_id("!~")
    assert not valid_id("") and not valid_id(NO_ID) and not valid_id("x" * 33)
    assert not valid_id("a\tb") and not valid_id("é")


def test_request_line_refuses_an_id_the_guest_would_not_echo():
    assert request_line("c1-1", "GET k") == b"c1-1 GET k"
    with pytest.raises(ValueError):
        request_line("has space", "GET k")


def test_every_request_id_parser_is_the_shared_one():
    """No module of the gateway or the harness splits request lines on its own."""
    import ast

    from kvmrr_log.paths import REPO
    for rel in ("kvmrr/gateway.py", "harness/client.py", "harness/ftcluster.py"):
        tree = ast.parse((REPO / rel).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not names & {"_request_id", "request_id", "split_request"}, rel
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module == "kvmrr_log.requests" for a in n.names}
        assert imported, f"{rel} does not use kvmrr_log.requests"
