"""The Kafka version is written in one place, compose/kafka/pom.xml's <kafka.version>;
the Makefile, the image build, docker-compose and the tests read it from there."""
import subprocess

from harness.localkafka import kafka_version
from kvmrr_log.paths import REPO


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    names = out.stdout.split() if out.returncode == 0 else [
        str(p.relative_to(REPO)) for p in REPO.rglob("*")
        if p.is_file() and not {".git", ".venv", "build"} & set(p.relative_to(REPO).parts)]
    for name in names:
        try:
            yield name, (REPO / name).read_text()
        except (UnicodeDecodeError, OSError):
            continue


def test_the_kafka_version_is_written_only_in_the_pom():
    version = kafka_version()
    assert version.count(".") >= 1, version
    where = [name for name, text in _tracked_text_files() if version in text]
    assert where == ["compose/kafka/pom.xml"], where


def test_make_exports_the_pom_version():
    proc = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile",
                           "-f", "-", "print-kafka-version"], cwd=REPO, text=True,
                          input="print-kafka-version:\n\t@echo $$KAFKA_VERSION\n",
                          capture_output=True, timeout=60)
    assert proc.stdout.strip() == kafka_version(), proc.stderr
