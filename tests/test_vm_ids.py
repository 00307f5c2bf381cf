"""A VM id names the VM's Kafka topics (kvmrr.<vm>.log, ....succession): only Kafka's
legal topic characters, and short enough that its longest topic fits Kafka's 249."""
import pytest

from conftest import kvmrr
from kvmrr_log.kafka import TOPIC_NAME_MAX, VmIdError, topics
from kvmrr_log.urls import KafkaLog, LogUrlError, parse_log_url

LONGEST_SUFFIX = len("kvmrr.") + len(".succession")


@pytest.mark.parametrize("vm", ["vm1", "ft1a2b3c4d", "A.b_c-9", "x" * (TOPIC_NAME_MAX -
                                                                      LONGEST_SUFFIX)])
def test_legal_ids_name_topics(vm):
    assert parse_log_url(f"kafka://127.0.0.1:9/{vm}") == KafkaLog("127.0.0.1:9", vm)
    assert all(len(t) <= TOPIC_NAME_MAX for t in vars(topics(vm)).values())


@pytest.mark.parametrize("vm", ["bad!vm", "vm%201", "vm:1", "vm@x", "é", "a+b",
                                "x" * (TOPIC_NAME_MAX - LONGEST_SUFFIX + 1)])
def test_illegal_ids_are_refused(vm):
    with pytest.raises(LogUrlError, match="VM id"):
        parse_log_url(f"kafka://127.0.0.1:9/{vm}")
    with pytest.raises(VmIdError):
        topics(vm)


@pytest.mark.parametrize("verb", [["record", "kvstore"], ["replay"], ["archive", "-o", "x.avro"],
                                  ["follow", "--backup-id", "b1"], ["gateway"]])
def test_cli_refuses_a_bad_vm_id_with_exit_2_and_one_line(verb):
    """Before any Kafka client starts (port 9 on loopback: nothing is asked)."""
    proc = kvmrr(*verb, "--log", "kafka://127.0.0.1:9/bad$vm", check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmrr: error: VM id 'bad$vm'"), lines


def test_kafka_clients_are_named_by_role_and_vm():
    """client.id kvmrr.<vm>.<role> (recorder, backup.<id>, replay, gateway, archive...):
    every Kafka client the runtime makes says which VM and which part it is."""
    import ast

    from kvmrr_log.kafka import client_conf, client_id
    from kvmrr_log.paths import REPO
    assert client_conf("h:1", client_id("vm1", "backup.b1"))["client.id"] == "kvmrr.vm1.backup.b1"
    for pkg in ("recorder", "replayer", "kvmrr", "harness", "bench"):
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "client_conf"):
                    assert len(node.args) == 2, f"{path}:{node.lineno}: client_conf without an id"
