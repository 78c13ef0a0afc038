"""Keep torch.compile's work on disk where a later run, or a resume, finds it again.

The train stage's first optimizer step compiles the decoder layers (Dynamo, AOTAutograd, Inductor, Triton): 28-47 s
on an H100 at the study's shape, against ~2.7-2.9 s for every later step, and 10 s with this cache warm. Inductor and
Triton cache what they build on disk, by default under /tmp (`/tmp/torchinductor_<user>`, which a reboot or a
fresh container empties) and ~/.triton. `use_persistent_cache()` puts both under one directory that outlives those:

    $GRPO_GSM8K_COMPILE_CACHE, else $XDG_CACHE_HOME/grpo-gsm8k/torch-compile, else ~/.cache/grpo-gsm8k/torch-compile

A TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR already set in the environment wins. Entries are keyed by the
graph, the torch and Triton versions and the GPU, so an entry from another setup is a miss, never a wrong kernel;
deleting the directory only costs the next run its compile time. Dynamo still traces each layer variant afresh
in every process (about 5 s on an H100 host); the compiled graphs are read back.

A fresh machine has no such directory. With a checkpoint remote, the train stage therefore also keeps one portable
bundle of the run's compiled graphs next to its checkpoints, `<remote>/compile-cache/<torch>-<device>.bin`
(torch.compiler.save_cache_artifacts: Inductor's and AOTAutograd's entries with their Triton binaries): a resume
loads it before training (`fetch_portable`), and a process that had to build graphs uploads it after its first
step (`upload_portable`). Either failing is a `warning:` line and costs only compile time. fastgen's own Triton
kernels are not in the bundle; they compile in seconds.

`FirstStepClock` times the first optimizer step of the process (where the compiling happens) and counts what
it read back (hits) and built (misses); the train stage prints that and keeps it in summary.json `first_step`.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from transformers import TrainerCallback

from grpo_gsm8k.io import first_line
from grpo_gsm8k.training.checkpoint_sync import RemoteStore, warn

ENV = "GRPO_GSM8K_COMPILE_CACHE"
PORTABLE_DIR = "compile-cache"  # under the run's checkpoint remote, beside checkpoint-<step>/
COUNTED = {("inductor", "fxgraph_cache_hit"): "inductor_hits", ("inductor", "fxgraph_cache_miss"): "inductor_misses",
           ("aot_autograd", "autograd_cache_hit"): "autograd_hits",
           ("aot_autograd", "autograd_cache_miss"): "autograd_misses"}


def cache_root(environ: dict | None = None) -> Path:
    """The directory the caches go under (see the module docstring for the order of choice)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV):
        return Path(environ[ENV]).expanduser().absolute()
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser().absolute() if xdg else Path.home() / ".cache"
    return base / "grpo-gsm8k" / "torch-compile"


def use_persistent_cache(environ: dict | None = None) -> dict:
    """Point Inductor's and Triton's caches under `cache_root()`, unless the user chose them.

    Importing torch._dynamo (transformers and peft do) already writes Inductor's default, /tmp/torchinductor_<user>,
    into TORCHINDUCTOR_CACHE_DIR; that default, or a directory this function set before, is replaced; any other
    value is the user's and stays. Inductor reads the variable at each use, so this holds for every compilation
    after the call. Returns the two directories in use."""
    environ = os.environ if environ is None else environ
    root = cache_root(environ)
    replaceable = {None, *_ours, _inductor_default()}
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        if environ.get(name) in replaceable:
            environ[name] = str(root / sub)
            _ours.add(environ[name])
    return {"inductor": environ["TORCHINDUCTOR_CACHE_DIR"], "triton": environ["TRITON_CACHE_DIR"]}


_ours: set[str] = set()  # directories use_persistent_cache set in this process


def _inductor_default() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def start_compile_workers() -> None:
    """Start Inductor's compile worker processes now, so that their start-up overlaps loading the model.

    Inductor starts them at its first compilation, and a graph read from the cache still hands its Triton kernels
    to them to load. Started here, on an H100 host they were ready 7 s later, before the first graph was loaded
    (bench/RESULTS.md)."""
    from torch._inductor.async_compile import maybe_warm_pool

    maybe_warm_pool()


def cache_counts() -> dict:
    """Compiled graphs this process read from the caches (hits) and had to build (misses), so far."""
    from torch._dynamo.utils import counters

    return {name: int(counters[group][key]) for (group, key), name in COUNTED.items()}


def portable_name() -> str:
    """The bundle's file name: compiled code is only valid for one torch build and one kind of device."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", f"torch-{torch.__version__}-{device}") + ".bin"


def _portable_path(remote_uri: str, storage_options: dict | None):
    store = RemoteStore(remote_uri, storage_options)  # the checkpoints' own view of the remote
    return store.fs, f"{store.root}/{PORTABLE_DIR}/{portable_name()}"


def fetch_portable(remote_uri: str, storage_options: dict | None = None) -> int:
    """Load the run's bundle from the remote into this process's caches. Returns the graphs it held (0: none)."""
    import torch

    try:
        fs, path = _portable_path(remote_uri, storage_options)
        data = fs.cat_file(path)
    except FileNotFoundError:
        return 0
    except Exception as err:  # the server: training goes on, compiling from scratch
        warn(f"could not read the compile cache {remote_uri}/{PORTABLE_DIR} ({first_line(err)}); compiling anew")
        return 0
    torch_log = logging.getLogger("torch.compiler._cache")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # it logs a bad bundle with a traceback; we say it in one line
    try:
        info = torch.compiler.load_cache_artifacts(data)
        problem = None if info is not None else "its checksum or format does not match"
    except Exception as err:
        problem = first_line(err)
    finally:
        torch_log.setLevel(level)
    if problem:  # e.g. a truncated or foreign object
        warn(f"{remote_uri}/{PORTABLE_DIR}/{portable_name()} is not a readable compile cache ({problem}); "
             "compiling anew, and the next upload replaces it")
        return 0
    return sum(len(keys) for keys in info.artifacts.values())


def upload_portable(remote_uri: str, storage_options: dict | None = None) -> int:
    """Write what this process compiled or read back so far as the run's bundle. Returns the graphs in it."""
    import torch

    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts:
        return 0
    data, info = artifacts
    try:
        fs, path = _portable_path(remote_uri, storage_options)
        fs.pipe_file(path, data)  # one object: the server stores it whole or not at all
    except Exception as err:
        warn(f"could not upload the compile cache to {remote_uri}/{PORTABLE_DIR} ({first_line(err)}); "
             "a resume on another machine compiles anew")
        return 0
    return sum(len(keys) for keys in info.artifacts.values())


def share_through_remote(remote_uri: str, clock: "FirstStepClock", upload: bool) -> int:
    """Load the run's bundle now (before the first compilation); if `upload`, upload a new one after a first step
    that built graphs. Call it after use_persistent_cache(): loading writes into the cache in use.
    Returns the graphs loaded."""
    loaded = fetch_portable(remote_uri)
    if loaded:
        print(f"train: {loaded} compiled graphs loaded from {remote_uri}/{PORTABLE_DIR}", flush=True)

    def upload_now():
        if sent := upload_portable(remote_uri):
            print(f"train: {sent} compiled graphs uploaded to {remote_uri}/{PORTABLE_DIR}", flush=True)

    clock.after_building = upload_now if upload else None
    return loaded


class FirstStepClock(TrainerCallback):
    """Wall time of this process's first optimizer step (a resume's first step too), and the graphs compiled
    from the start of training to the end of that step, read back or built."""

    def __init__(self):
        self.report: dict = {}
        self.after_building = None  # called when the first step had to build graphs (share_through_remote)
        self._start = None
        self._counts_before: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._counts_before = cache_counts()  # the counters are per process; a test may train twice in one

    def on_step_begin(self, args, state, control, **kwargs):
        if self._start is None:
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.report or self._start is None:
            return
        _wait_for_gpu()
        counts = {k: v - self._counts_before.get(k, 0) for k, v in cache_counts().items()}
        self.report = {"step": state.global_step, "seconds": round(time.perf_counter() - self._start, 2), **counts}
        hits, misses = self.report["inductor_hits"], self.report["inductor_misses"]
        graphs = f"compiled graphs read from the cache: {hits}, built: {misses}" if hits or misses else "none compiled"
        print(f"train: first step (step {state.global_step}) took {self.report['seconds']:.1f} s; {graphs}",
              flush=True)
        # Inductor's misses only: AOTAutograd can count misses in a process that built no graph (3 on an H100
        # before the layers' floats were compiled in as constants).
        if self.after_building and self.report["inductor_misses"]:
            self.after_building()


def _wait_for_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
