"""kafkasecrets — the secrets of a secure kvmrr Kafka, made once and kept (stdlib + openssl).

`kafkactl secrets --dir DIR [--vm VM ...]` (and `make secrets`, DIR = build/secrets, which
git ignores) writes what is missing, never what exists, every file mode 0600 in a 0700
folder:

    ca.key, ca.pem               a local CA (EC P-256, 10 years); ca.pem is every client's
                                 trust anchor (librdkafka's ssl.ca.location) and the
                                 brokers' PEM truststore
    broker.pem                   the brokers' PEM keystore: PKCS#8 key + certificate signed
                                 by the CA, for localhost, 127.0.0.1, kafka1..3 and
                                 kvmrr-kafka1..3 (the compose brokers' names)
    gateway-tls.pem              the gateway's key + certificate (`kvmrr gateway
                                 --tls-cert`), for localhost, 127.0.0.1, gateway and
                                 kvmrr-gateway
    users.json                   {principal: password}: admin, broker (inter-broker and the
                                 controller listener), vm-<vm> (the VM's primary and
                                 backups), gateway-<vm>
    <vm>.mackey                  the VM's record key (HMAC-SHA256, 32 random bytes in hex)
    <principal>.conf             a client's Kafka settings: librdkafka properties, paths
                                 relative to this folder, plus kvmrr.record.key.file for
                                 the VM's processes and its gateway.  A kvmrr process
                                 finds its own through KVMRR_KAFKA_CONFIG=FILE.

A new CA (ca.key missing) makes a new broker certificate.  Passwords are 32 hex digits
(no character SCRAM's `--add-scram` syntax or a JAAS line would have to quote).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

BROKER_NAMES = ["localhost", "kafka1", "kafka2", "kafka3",
                "kvmrr-kafka1", "kvmrr-kafka2", "kvmrr-kafka3"]
BROKER_IPS = ["127.0.0.1"]
GATEWAY_NAMES = ["localhost", "gateway", "kvmrr-gateway"]
VM_RE = re.compile(r"[a-zA-Z0-9._-]+")   # the same as kvmrr_log.kafka.VM_ID_CHARS


class SecretsError(Exception):
    pass


def vm_principal(vm: str) -> str:
    return f"vm-{vm}"


def gateway_principal(vm: str) -> str:
    return f"gateway-{vm}"


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if not exe:
        raise SecretsError("openssl not found (setup/doctor installs it)")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SecretsError(f"openssl {args[0]} failed: {proc.stderr.strip()[-400:]}")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _make_ca(d: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", "ca.key", cwd=d)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "3650",
             "-subj", "/CN=kvmrr local CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=d)


def _make_server_cert(d: Path, out: str, cn: str, names: list[str]) -> None:
    """out: a PEM with a PKCS#8 key and its certificate, signed by the CA, for names and
    127.0.0.1."""
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{ip}" for ip in BROKER_IPS])
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        t = Path(tmp)
        (t / "ext.cnf").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,"
                                   f"clientAuth\nkeyUsage=critical,digitalSignature\n")
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", str(t / "k.pem"), cwd=d)
        # Kafka's PEM keystore reads PKCS#8 keys only
        _openssl("pkcs8", "-topk8", "-nocrypt", "-in", str(t / "k.pem"),
                 "-out", str(t / "k8.pem"), cwd=d)
        _openssl("req", "-new", "-key", str(t / "k8.pem"), "-subj", f"/CN={cn}",
                 "-out", str(t / "req.pem"), cwd=d)
        _openssl("x509", "-req", "-in", str(t / "req.pem"), "-CA", "ca.pem", "-CAkey",
                 "ca.key", "-CAcreateserial", "-days", "825", "-sha256", "-extfile",
                 str(t / "ext.cnf"), "-out", str(t / "cert.pem"), cwd=d)
        _write_private(d / out,
                       (t / "k8.pem").read_text() + (t / "cert.pem").read_text())
    (d / "ca.srl").unlink(missing_ok=True)


def client_conf_text(user: str, password: str, record_key: str | None) -> str:
    lines = ["# written by kafkactl secrets: a kvmrr client's Kafka settings",
             "# (KVMRR_KAFKA_CONFIG=this file; relative paths are from its folder)",
             "security.protocol=SASL_SSL", "sasl.mechanisms=SCRAM-SHA-512",
             f"sasl.username={user}", f"sasl.password={password}",
             "ssl.ca.location=ca.pem"]
    if record_key:
        lines.append(f"kvmrr.record.key.file={record_key}")
    return "\n".join(lines) + "\n"


def ensure(d: Path, vms: list[str]) -> list[str]:
    """Make what is missing in d for these VMs; the names of the files written."""
    for vm in vms:
        if not VM_RE.fullmatch(vm):
            raise SecretsError(f"VM id {vm!r}: letters, digits, '.', '_' and '-' only")
    d = d.resolve()       # openssl runs in d: every path it gets must be absolute
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    written = []
    if not (d / "ca.key").exists() or not (d / "ca.pem").exists():
        _make_ca(d)
        (d / "broker.pem").unlink(missing_ok=True)
        (d / "gateway-tls.pem").unlink(missing_ok=True)
        written += ["ca.key", "ca.pem"]
    if not (d / "broker.pem").exists():
        _make_server_cert(d, "broker.pem", "kvmrr broker", BROKER_NAMES)
        written.append("broker.pem")
    if not (d / "gateway-tls.pem").exists():
        _make_server_cert(d, "gateway-tls.pem", "kvmrr gateway", GATEWAY_NAMES)
        written.append("gateway-tls.pem")
    users_path = d / "users.json"
    users = json.loads(users_path.read_text()) if users_path.exists() else {}
    wanted = ["admin", "broker"] + [p for vm in vms
                                    for p in (vm_principal(vm), gateway_principal(vm))]
    new = [u for u in wanted if u not in users]
    for u in new:
        users[u] = secrets.token_hex(16)
    if new or not users_path.exists():
        _write_private(users_path, json.dumps(users, indent=1, sort_keys=True) + "\n")
        written.append("users.json")
    for vm in vms:
        key = d / f"{vm}.mackey"
        if not key.exists():
            _write_private(key, secrets.token_hex(32) + "\n")
            written.append(key.name)
    for user, pw in users.items():
        conf = d / f"{user}.conf"
        vm = user.split("-", 1)[1] if user.startswith(("vm-", "gateway-")) else None
        text = client_conf_text(user, pw, f"{vm}.mackey" if vm else None)
        if not conf.exists() or conf.read_text() != text:
            _write_private(conf, text)
            written.append(conf.name)
    for p in d.iterdir():
        os.chmod(p, 0o600)
    return written


def users(d: Path) -> dict[str, str]:
    try:
        return json.loads((d / "users.json").read_text())
    except (OSError, ValueError) as exc:
        raise SecretsError(f"no secrets in {d} ({exc}): run `make secrets`") from None
