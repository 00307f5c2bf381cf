"""How a kvmrr process signs in to a secure Kafka (docs/operating.md §6): one way only, the
file named by KVMRR_KAFKA_CONFIG.

The file is what `kafkactl secrets` writes per principal (admin.conf, vm-<vm>.conf,
gateway-<vm>.conf): librdkafka properties (`security.protocol`, `sasl.*`, `ssl.*`), one
`key=value` a line, paths relative to the file's folder, plus `kvmrr.record.key.file`, the
VM's record key (kvmrr_log.record_mac) for the VM's processes and its gateway.  Without
KVMRR_KAFKA_CONFIG a client speaks PLAINTEXT and no record is keyed: the plain loopback
broker of the tests and `make kafka`.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "KVMRR_KAFKA_CONFIG"
RECORD_KEY_FILE = "kvmrr.record.key.file"
PATH_SETTINGS = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location",
                 RECORD_KEY_FILE)
ALLOWED_PREFIXES = ("security.protocol", "sasl.", "ssl.")


class KafkaConfigError(ValueError):
    """The Kafka client configuration cannot be used; one line."""


@dataclass(frozen=True)
class KafkaConfig:
    path: Path | None
    settings: dict = field(default_factory=dict)   # merged into every client's settings
    record_key: bytes | None = None


PLAIN = KafkaConfig(None)


def load(path: Path) -> KafkaConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KafkaConfigError(f"{ENV}={path}: cannot read it ({exc.strerror})") from None
    settings: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise KafkaConfigError(f"{path} line {n}: not key=value")
        if name != RECORD_KEY_FILE and not name.startswith(ALLOWED_PREFIXES):
            # only how to connect: the client settings the code chose stay its own
            raise KafkaConfigError(f"{path} line {n}: {name} is not a security setting")
        if name in PATH_SETTINGS:
            value = str((path.parent / value).resolve())
        settings[name] = value
    key = None
    key_file = settings.pop(RECORD_KEY_FILE, None)
    if key_file:
        try:
            key = bytes.fromhex(Path(key_file).read_text().strip())
        except OSError as exc:
            raise KafkaConfigError(f"{path}: record key {key_file}: {exc.strerror}") from None
        except ValueError:
            raise KafkaConfigError(f"{path}: record key {key_file} is not hex") from None
        if len(key) < 16:
            raise KafkaConfigError(f"{path}: record key {key_file} is shorter than 16 bytes")
    return KafkaConfig(path, settings, key)


_cache: dict[tuple, KafkaConfig] = {}
_checked: dict[str, tuple[float, KafkaConfig]] = {}   # env value -> (when, config)
RECHECK_S = 1.0    # readers ask per record: the file is looked at again at most this often


@contextlib.contextmanager
def using(path: Path | None):
    """KVMRR_KAFKA_CONFIG=path (unset for None) within the block: a harness signing in as
    one principal for its own reads, then as it was."""
    before = os.environ.get(ENV)
    if path is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def env_for(path: Path | None) -> dict:
    """os.environ for a child process signing in with path (PLAIN for None)."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if path is not None:
        env[ENV] = str(path)
    return env


def current() -> KafkaConfig:
    """The configuration KVMRR_KAFKA_CONFIG names (read again when the file changes), or
    PLAIN when it is unset."""
    name = os.environ.get(ENV, "").strip()
    if not name:
        return PLAIN
    now = time.monotonic()
    seen = _checked.get(name)
    if seen and now - seen[0] < RECHECK_S:
        return seen[1]
    path = Path(name).expanduser()
    try:
        stamp = (str(path), path.stat().st_mtime_ns)
    except OSError as exc:
        raise KafkaConfigError(f"{ENV}={name}: {exc.strerror}") from None
    if stamp not in _cache:
        _cache.clear()
        _cache[stamp] = load(path)
    _checked.clear()
    _checked[name] = (now, _cache[stamp])
    return _cache[stamp]
