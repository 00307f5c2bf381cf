"""Provisioning a VM on a secure Kafka (docs/operating.md §6.2): its topics, its principals'
SCRAM credentials and the ACLs that are all they may do.  Run as the admin principal
(`KVMRR_KAFKA_CONFIG=build/secrets/admin.conf kvmrr provision --log kafka://HOST:PORT/VM`).

The broker denies whatever no ACL allows (StandardAuthorizer,
allow.everyone.if.no.acl.found=false).  Every ACL names one topic or group literally:
a prefix such as `kvmrr.vm1.` would also match VM `vm1.x`'s topics.

- vm-<vm> (the VM's primary and its backups: one principal, since a backup becomes the
  primary): read and write the log, snapshots, acks and .out; read .in (the requests) and
  .succession (its group decides the successor); its groups .inputs, .ackwatch,
  .successors.  Idempotent producers need nothing on the cluster since Kafka 3.0 (Write on
  the topic suffices, KIP-679).
- gateway-<vm>: write and read .in (it rebuilds what was sent); read .out and the log (the
  Epoch records); describe every topic of the VM (it checks they exist); its group .gateway.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation, AclPermissionType, ResourcePatternType,
                                   ResourceType, ScramCredentialInfo, ScramMechanism,
                                   UserScramCredentialUpsertion)

from kvmrr_log import kafka_config
from kvmrr_log.kafka import KafkaLogError, admin_client, client_id, ensure_topics, topics

R, W, D = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
SCRAM_ITERATIONS = 8192


def vm_principal(vm: str) -> str:
    return f"vm-{vm}"


def gateway_principal(vm: str) -> str:
    return f"gateway-{vm}"


def grants(vm: str) -> list[tuple[str, ResourceType, str, AclOperation]]:
    """(principal, resource type, resource name, operation): everything the VM's two
    principals may do."""
    t = topics(vm)
    replica, gateway = vm_principal(vm), gateway_principal(vm)
    topic = ResourceType.TOPIC
    out = []
    for name, ops in ((t.log, (R, W, D)), (t.snapshots, (R, W, D)), (t.acks, (R, W, D)),
                      (t.outputs, (R, W, D)), (t.inputs, (R, D)), (t.succession, (R, D))):
        out += [(replica, topic, name, op) for op in ops]
    for name, ops in ((t.inputs, (R, W, D)), (t.outputs, (R, D)), (t.log, (R, D)),
                      (t.snapshots, (D,)), (t.acks, (D,)), (t.succession, (D,))):
        out += [(gateway, topic, name, op) for op in ops]
    for group in ("inputs", "ackwatch", "successors"):
        out += [(replica, ResourceType.GROUP, f"kvmrr.{vm}.{group}", op) for op in (R, D)]
    out += [(gateway, ResourceType.GROUP, f"kvmrr.{vm}.gateway", op) for op in (R, D)]
    return out


# The readers' scratch groups (kvmrr-reader-*, kvmrr-epochs-*, kvmrr-scan, ...): a consumer
# with a group.id asks for its coordinator even when it assigns its partitions itself, and
# is refused without Read on the group.  These groups hold nothing (no member commits, none
# subscribes), so they are granted by prefix; the groups that decide anything are literal.
SCRATCH_GROUPS = "kvmrr-"


def acl_bindings(vm: str) -> list[AclBinding]:
    literal = [AclBinding(rtype, name, ResourcePatternType.LITERAL, f"User:{who}", "*", op,
                          AclPermissionType.ALLOW)
               for who, rtype, name, op in grants(vm)]
    scratch = [AclBinding(ResourceType.GROUP, SCRATCH_GROUPS, ResourcePatternType.PREFIXED,
                          f"User:{who}", "*", R, AclPermissionType.ALLOW)
               for who in (vm_principal(vm), gateway_principal(vm))]
    return literal + scratch


def _passwords() -> dict[str, str]:
    """users.json beside the admin's config file (`kafkactl secrets` writes both)."""
    cfg = kafka_config.current()
    if cfg.path is None:
        raise KafkaLogError(f"provisioning needs the admin's credentials: set "
                            f"{kafka_config.ENV} to the admin's config (build/secrets/admin.conf)")
    try:
        return json.loads((Path(cfg.path).parent / "users.json").read_text())
    except (OSError, ValueError) as exc:
        raise KafkaLogError(f"no users.json beside {cfg.path}: {exc}") from None


def provision(bootstrap: str, vm: str) -> int:
    """Topics, the two principals' SCRAM credentials (upserted: a VM added after the
    brokers were formatted), and the ACLs (creating one that exists is a no-op).  The
    number of ACLs; KafkaLogError when the admin may not."""
    passwords = _passwords()
    admin = admin_client(bootstrap, client_id(vm, "admin"))
    users = [vm_principal(vm), gateway_principal(vm)]
    missing = [u for u in users if u not in passwords]
    if missing:
        raise KafkaLogError(f"no password for {', '.join(missing)}: run `make secrets "
                            f"VMS={vm}` (kafkactl secrets --vm {vm})")
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts = [UserScramCredentialUpsertion(u, info, passwords[u].encode()) for u in users]
    try:
        for fut in admin.alter_user_scram_credentials(upserts).values():
            fut.result()
        ensure_topics(bootstrap, vm)
        bindings = acl_bindings(vm)
        for fut in admin.create_acls(bindings, request_timeout=20).values():
            fut.result()
        _wait_visible(admin, vm, len(bindings))
    except KafkaException as exc:
        raise KafkaLogError(f"provisioning VM {vm}: {exc.args[0].str()}") from None
    return len(bindings)


def _wait_visible(admin, vm: str, count: int, timeout: float = 20.0) -> None:
    """Until a broker's authorizer holds them all: ACLs reach it through the metadata log,
    a moment after CreateAcls answers, and a client started sooner is refused."""
    deadline = time.monotonic() + timeout
    wanted = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                              AclOperation.ANY, AclPermissionType.ANY)
    users = {f"User:{vm_principal(vm)}", f"User:{gateway_principal(vm)}"}
    while True:
        seen = admin.describe_acls(wanted, request_timeout=10).result()
        if sum(b.principal in users for b in seen) >= count:
            return
        if time.monotonic() > deadline:
            raise KafkaLogError(f"provisioning VM {vm}: its ACLs are not in force after "
                                f"{timeout:.0f} s")
        time.sleep(0.1)
