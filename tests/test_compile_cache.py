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
