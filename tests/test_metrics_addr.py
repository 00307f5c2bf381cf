"""The metrics endpoint listens on loopback unless KVMRR_METRICS_ADDR names another address
(the kvmrr/node image sets 0.0.0.0, so its exposed port 9100 can be scraped)."""
import urllib.request

from harness.localkafka import free_base_port
from kvmrr_log.paths import REPO
from replayer import metrics


def _get(host: str, port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2).read()
        return True
    except OSError:
        return False


def test_default_is_loopback(monkeypatch):
    monkeypatch.delenv(metrics.METRICS_ADDR_ENV, raising=False)
    assert metrics.metrics_addr() == "127.0.0.1"


def test_the_address_comes_from_the_environment(monkeypatch):
    """Another loopback address stands for the container's 0.0.0.0 (a test binds nothing
    outside loopback): the endpoint is there, and only there."""
    monkeypatch.setenv(metrics.METRICS_ADDR_ENV, "127.0.0.2")
    port = free_base_port(1)
    server, thread = metrics.serve(port)
    try:
        assert server.server_address[0] == "127.0.0.2"
        assert _get("127.0.0.2", port)
        assert not _get("127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()


def test_the_node_image_listens_on_every_interface():
    text = (REPO / "compose" / "images" / "node.Dockerfile").read_text()
    assert "KVMRR_METRICS_ADDR=0.0.0.0" in text
