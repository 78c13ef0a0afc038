"""pytest plugin: the `s3_server` fixture, a real local SeaweedFS S3 server for one test.

Load it from tests/conftest.py with `pytest_plugins = ["tests.conftest_s3"]`, or on the
command line: `python -m pytest tests/test_s3server.py -p tests.conftest_s3`.

`s3_server`: one server per test, which the test may stop and restart.
`shared_s3_server`: one per session (per xdist worker), for tests that only read and
write; they must not stop it and should use their own key prefix.
Each server gets its own data dir and its own free ports, so parallel runs don't
clash. Tests using either get the `s3` marker.
"""

from __future__ import annotations

import pytest

from grpo_gsm8k.tools.s3server import S3Server, find_weed

TEST_BUCKET = "test-bucket"


def pytest_collection_modifyitems(items):
    # `-m "not s3"` then deselects everything that starts a server.
    for item in items:
        if {"s3_server", "shared_s3_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)


def fast_fail_options(server: S3Server) -> dict:
    """s3fs options that fail in about a second when the server is down (botocore retries ~7 s)."""
    config = {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 10}
    return server.storage_options(config_kwargs=config, skip_instance_cache=True)


def running_server(data_dir):
    try:
        find_weed()
    except FileNotFoundError as err:
        pytest.skip(f"no SeaweedFS binary: {err}")
    server = S3Server(data_dir=data_dir, port=0, bucket=TEST_BUCKET)
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_server(tmp_path):
    yield from running_server(tmp_path / "s3data")


@pytest.fixture(scope="session")
def shared_s3_server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("shared-s3"))
