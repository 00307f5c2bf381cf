"""kvmrr nodes as Docker containers, seen the way FtCluster sees a local process.

`ContainerProcess` gives a running container the part of the subprocess.Popen interface
FtCluster and its Node use: stdout/stderr (from `docker logs -f`, which keeps the two
streams apart), poll/wait/returncode, send_signal/kill (`docker kill`).  So the compose
demo and the container tests script the same scenarios as `make run` and the local
fault-tolerance tests, on containers instead of processes.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time


class DockerError(RuntimeError):
    pass


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run the docker CLI; its stdout, or DockerError with its stderr."""
    if shutil.which("docker") is None:
        raise DockerError("no docker CLI on PATH")
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise DockerError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def engine_answers() -> bool:
    try:
        docker("info", "--format", "{{.ServerVersion}}", timeout=20)
        return True
    except (DockerError, subprocess.TimeoutExpired):
        return False


class ContainerProcess:
    """A container as a Popen-like process: its logs are the process's output."""

    def __init__(self, container: str):
        self.container = container
        self.pid = container            # what a message naming the process shows
        self.returncode: int | None = None
        self._logs = subprocess.Popen(["docker", "logs", "-f", container], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout, self.stderr = self._logs.stdout, self._logs.stderr

    def poll(self) -> int | None:
        if self.returncode is None:
            state = docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}",
                           self.container, check=False)
            running, _, code = state.partition(" ")
            if running == "false":
                self.returncode = int(code)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                out = docker("wait", self.container, timeout=timeout or 10 ** 6)
            except subprocess.TimeoutExpired:
                raise subprocess.TimeoutExpired(f"docker wait {self.container}", timeout) from None
            self.returncode = int(out.splitlines()[-1])
        try:
            self._logs.wait(10)
        except subprocess.TimeoutExpired:
            self._logs.kill()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            docker("kill", "-s", str(int(sig)), self.container, check=False)

    def kill(self) -> None:
        self.send_signal(9)

    def close(self) -> None:
        if self._logs.poll() is None:
            self._logs.kill()
            self._logs.wait()


def health(container: str) -> str:
    """healthy, unhealthy, starting, or the state of a container without a healthcheck."""
    return docker("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}"
                  "{{else}}{{.State.Status}}{{end}}", container, check=False) or "missing"


def wait_healthy(containers: list[str], timeout: float = 240) -> None:
    """Until every container reports healthy; DockerError if one stops or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        states = {c: health(c) for c in containers}
        if all(s == "healthy" for s in states.values()):
            return
        # unhealthy may pass (brokers of a cluster with one restarting); stopped will not
        gone = {c: s for c, s in states.items() if s in ("exited", "dead", "missing")}
        if gone or time.monotonic() > deadline:
            raise DockerError(f"not healthy after {timeout:.0f} s: {gone or states}")
        time.sleep(1)


if __name__ == "__main__":   # python -m harness.containers wait-healthy NAME...  (make compose-up)
    if sys.argv[1:2] != ["wait-healthy"]:
        sys.exit("usage: python -m harness.containers wait-healthy CONTAINER...")
    t0 = time.monotonic()
    try:
        wait_healthy(sys.argv[2:])
    except DockerError as exc:
        sys.exit(f"kvmrr: {exc}")
    print(f"healthy after {time.monotonic() - t0:.0f} s: {' '.join(sys.argv[2:])}")
