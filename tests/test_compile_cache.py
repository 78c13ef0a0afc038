"""Where the compile cache goes (a table), and that it is only moved where the user did not choose."""
from __future__ import annotations

from pathlib import Path

import pytest

from grpo_gsm8k.training.compile_cache import ENV, _inductor_default, cache_root, use_persistent_cache

HOME_CACHE = Path.home() / ".cache" / "grpo-gsm8k" / "torch-compile"


@pytest.mark.parametrize("environ, expected", [
    ({}, HOME_CACHE),                                                          # nothing set: under ~/.cache
    ({"XDG_CACHE_HOME": "/xdg"}, Path("/xdg/grpo-gsm8k/torch-compile")),       # the XDG base directory
    ({ENV: "/mine", "XDG_CACHE_HOME": "/xdg"}, Path("/mine")),                 # the project's variable wins
    ({ENV: "", "XDG_CACHE_HOME": "/xdg"}, Path("/xdg/grpo-gsm8k/torch-compile")),  # empty counts as unset
    ({ENV: "rel"}, Path.cwd() / "rel"),                                        # relative: from the working dir
])
def test_cache_root(environ, expected):
    assert cache_root(environ) == expected


@pytest.mark.parametrize("inductor, triton, expected_inductor, expected_triton", [
    (None, None, "/c/inductor", "/c/triton"),              # unset: both under the root
    ("DEFAULT", None, "/c/inductor", "/c/triton"),         # Inductor's own /tmp default is not a choice
    ("/user/ind", None, "/user/ind", "/c/triton"),         # the user's choice stays
    (None, "/user/tri", "/c/inductor", "/user/tri"),
])
def test_use_persistent_cache_keeps_what_the_user_chose(inductor, triton, expected_inductor, expected_triton):
    environ = {ENV: "/c"}
    if inductor:
        environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_default() if inductor == "DEFAULT" else inductor
    if triton:
        environ["TRITON_CACHE_DIR"] = triton
    assert use_persistent_cache(environ) == {"inductor": expected_inductor, "triton": expected_triton}
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == expected_inductor and environ["TRITON_CACHE_DIR"] == expected_triton


def test_a_later_call_moves_what_an_earlier_call_set():
    """A second run in one process (a test, a notebook) with another root follows it."""
    environ = {ENV: "/first"}
    use_persistent_cache(environ)
    environ[ENV] = "/second"
    assert use_persistent_cache(environ) == {"inductor": "/second/inductor", "triton": "/second/triton"}


@pytest.mark.parametrize("choice, cuda, expected", [
    (None, True, True),     # auto: compile on a GPU
    (None, False, False),   # auto: not on CPU, where Inductor's C++ builds cost minutes
    (True, False, True),    # train.compile: true compiles anywhere
    (False, True, False),
])
def test_will_compile(choice, cuda, expected):
    from grpo_gsm8k.training.speedups import will_compile

    assert will_compile(choice, cuda) is expected


def test_a_missing_bundle_is_silent_and_a_corrupt_or_unreachable_one_is_a_warning(shared_s3_server, monkeypatch,
                                                                                  capsys):
    """A resume on a fresh machine never fails for the compile cache: it compiles anew, and says why."""
    import fsspec

    from grpo_gsm8k.training.compile_cache import PORTABLE_DIR, fetch_portable, portable_name

    for name, value in shared_s3_server.env().items():
        monkeypatch.setenv(name, value)
    remote = f"s3://{shared_s3_server.bucket}/compile-cache-faults"
    assert fetch_portable(remote) == 0
    assert capsys.readouterr().err == ""
    with fsspec.open(f"{remote}/{PORTABLE_DIR}/{portable_name()}", "wb") as handle:
        handle.write(b"not a bundle")
    assert fetch_portable(remote) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "is not a readable compile cache" in err and err.count("\n") == 1
    nothing_listens = {"endpoint_url": "http://127.0.0.1:9", "skip_instance_cache": True,
                       "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    assert fetch_portable(remote, storage_options=nothing_listens) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: could not read the compile cache") and err.count("\n") == 1


@pytest.mark.parametrize("choice, cuda, half, attention, trimmed, expected", [
    (None, True, True, True, True, True),      # auto: CUDA in bf16/fp16, where flash's varlen kernel runs
    (None, True, False, True, True, False),    # fp32 on CUDA: the masked fallback would be quadratic
    (None, False, False, True, True, False),   # CPU: trimming alone
    (True, False, False, True, True, True),    # asked for: packs anywhere (the CPU tests do)
    (True, True, True, False, True, False),    # needs the packed attention (bounds as the mask)
    (True, True, True, True, False, False),    # and trimming's path
    (False, True, True, True, True, False),
])
def test_will_pack_rows(choice, cuda, half, attention, trimmed, expected):
    from grpo_gsm8k.training.speedups import will_pack_rows

    assert will_pack_rows(choice, cuda=cuda, half=half, packed_attention=attention, trimmed=trimmed) is expected
