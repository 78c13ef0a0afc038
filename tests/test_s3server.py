"""Tests for grpo_gsm8k.tools.s3server against a real SeaweedFS process.

    python -m pytest tests/test_s3server.py -q -p tests.conftest_s3
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs

from grpo_gsm8k.tools.s3server import S3Server, S3ServerError, find_weed
from tests.conftest_s3 import fast_fail_options

REPO = Path(__file__).resolve().parents[1]


def s3server_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_gsm8k.tools.s3server", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=90)


def filesystem(server: S3Server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**fast_fail_options(server))


def test_cli_start_is_idempotent_and_stop_stops(tmp_path):
    try:
        find_weed()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    flags = ["--dir", str(tmp_path / "s3"), "--port", "0", "--bucket", "cli-bucket"]
    try:
        first = s3server_cli("start", *flags)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("started: http://127.0.0.1:")
        assert s3server_cli("start", *flags).stdout.startswith("already running")
        status = s3server_cli("status", *flags)
        assert status.returncode == 0 and status.stdout.startswith("running")
        exports = s3server_cli("env", *flags).stdout
        endpoint = first.stdout.split()[1]
        assert f"export AWS_ENDPOINT_URL={endpoint}\n" in exports
        # The printed lines must work with eval, and the server must accept the credentials they carry.
        shell = subprocess.run(["bash", "-c", f'eval "$1"; {sys.executable} -c "import s3fs; '
                                "print(s3fs.S3FileSystem().ls('cli-bucket'))\"", "_", exports],
                               capture_output=True, text=True, timeout=60)
        assert shell.returncode == 0 and shell.stdout.strip() == "[]", shell.stderr
    finally:
        stop = s3server_cli("stop", *flags)
    assert stop.stdout.strip() == "stopped"
    after = s3server_cli("status", *flags)
    assert after.returncode == 1 and after.stdout.strip() == "not running"
    assert s3server_cli("stop", *flags).stdout.strip() == "not running"


def test_data_survives_stop_and_kill_9(s3_server):
    fs = filesystem(s3_server)
    fs.pipe(f"{s3_server.bucket}/dir/object.bin", b"x" * 1000 + b"end")
    endpoint = s3_server.endpoint_url
    s3_server.stop()
    assert not s3_server.is_up()
    assert s3_server.start() is True
    assert s3_server.endpoint_url == endpoint  # restart keeps the port clients were told
    os.kill(s3_server.pid(), signal.SIGKILL)
    restarted = S3Server(data_dir=s3_server.data_dir, port=0, bucket=s3_server.bucket)
    assert restarted.start() is True
    assert filesystem(restarted).cat(f"{s3_server.bucket}/dir/object.bin") == b"x" * 1000 + b"end"


def test_readiness_check_needs_the_right_credentials(shared_s3_server):
    assert shared_s3_server.is_up()
    server = shared_s3_server
    impostor = S3Server(data_dir=server.data_dir, port=server.port, bucket=server.bucket, secret_key="not-the-secret")
    assert not impostor.answers()


def test_two_servers_run_side_by_side(shared_s3_server, tmp_path):
    s3_server = shared_s3_server
    other = S3Server(data_dir=tmp_path / "other", port=0, bucket=s3_server.bucket)
    try:
        assert other.start() is True
        assert other.endpoint_url != s3_server.endpoint_url
        key = f"{other.bucket}/{tmp_path.name}/only-here"
        filesystem(other).pipe(key, b"1")
        assert filesystem(other).exists(key)
        assert not filesystem(s3_server).exists(key)
    finally:
        other.stop()


def test_start_on_a_busy_port_fails_clearly(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = S3Server(data_dir=tmp_path / "s3", port=busy.getsockname()[1], bucket="some-bucket")
        with pytest.raises(S3ServerError, match="in use"):
            server.start()


def test_invalid_bucket_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="bucket name"):
        S3Server(data_dir=tmp_path, bucket="B")


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_push_then_pull_in_a_fresh_clone_is_byte_identical(shared_s3_server, tmp_path):
    s3_server = shared_s3_server
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    # Credentials through the environment only: the endpoint goes to the untracked config.local.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    dvc = [sys.executable, "-m", "dvc"]
    origin, clone = tmp_path / "origin", tmp_path / "clone"
    origin.mkdir()
    payload = os.urandom(200_000)
    (origin / "data.bin").write_bytes(payload)
    run(["git", "init", "-q"], origin, env)
    run([*dvc, "init", "-q"], origin, env)
    run([*dvc, "add", "-q", "data.bin"], origin, env)
    store = f"{s3_server.bucket}/{tmp_path.name}/dvcstore"  # own prefix on the shared server
    run([*dvc, "remote", "add", "-d", "store", f"s3://{store}"], origin, env)
    run([*dvc, "remote", "modify", "--local", "store", "endpointurl", s3_server.endpoint_url], origin, env)
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-qm", "data"], origin, env)
    run([*dvc, "push", "-q"], origin, env)
    assert filesystem(s3_server).find(store), "push stored nothing"

    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "data.bin").exists()
    assert not (clone / ".dvc" / "config.local").exists()  # the endpoint never travels with git
    run([*dvc, "remote", "modify", "--local", "store", "endpointurl", s3_server.endpoint_url], clone, env)
    run([*dvc, "pull", "-q"], clone, env)
    assert (clone / "data.bin").read_bytes() == payload
