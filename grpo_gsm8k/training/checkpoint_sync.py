"""Upload Trainer checkpoints to S3 in the background, prune them, and find one to resume from.

Used by the train stage (no CLI of its own):

    sync = CheckpointSync(output_dir, "s3://grpo-gsm8k/checkpoints/<run>", storage_options={}, keep=2)
    trainer = GRPOTrainer(..., callbacks=[sync])   # args.save_total_limit=None: we prune
    trainer.train(resume_from_checkpoint=resume_path(output_dir, remote_uri, storage_options={}))

A checkpoint is `output_dir/checkpoint-<step>/`. Its upload copies every file to
`<remote>/checkpoint-<step>/` and writes `manifest.json` (path, size, sha256 of each
file) LAST, so a remote checkpoint without a manifest that matches its files is
never taken as complete. The same manifest is also written into the local folder.

Why not `save_total_limit`: transformers deletes old checkpoints right after a
save, possibly before we uploaded them and without knowing the protected steps.
Leave it None; `keep` and `protect_steps` here prune both copies, and a local
copy is only deleted once its upload is complete.

storage_options go to fsspec (s3fs): {} takes credentials and endpoint from the
AWS_* environment (see `python -m grpo_gsm8k.tools.s3server env`).

Faults print one `warning:` line each on stderr and never stop training: a local or
remote checkpoint that fails its checks is named with the reason and skipped (resume
takes the newest one that verifies; a remote one that fails its hashes loses its
manifest, so the next upload of that step replaces it); an upload that fails (server
down, even between two files of one checkpoint) says that the checkpoint stays on
local disk, and is retried until it arrives whole; its manifest goes last, so a
half-uploaded checkpoint never counts.

Limitation: under multi-GPU training only rank 0 uploads, when rank 0's on_save
runs; rng_state_<rank>.pth files other ranks write later may miss the manifest.
Why over 300 lines: the uploader thread, the manifests, the remote listing and the resume choice share one
protocol (manifest last, verify before use); apart, each half would restate it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import fsspec
from transformers import TrainerCallback

from grpo_gsm8k.io import first_line, pid_alive

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


class ChecksumError(RuntimeError):
    """A fetched checkpoint does not match its manifest."""


class RemoteUnavailable(RuntimeError):
    """The remote could not be listed, so we cannot tell which checkpoint is newest."""


class RemoteRefused(RemoteUnavailable):
    """The remote answered, but refused our credentials (a wrong key or secret, no permission on the bucket)."""


def unavailable(message: str, err: Exception) -> RemoteUnavailable:
    """The error to raise for a remote that failed: one that says whether it answered and refused us."""
    return (RemoteRefused if isinstance(err, PermissionError) else RemoteUnavailable)(f"{message}: {first_line(err)}")


def warn(message: str) -> None:
    """One line on stderr: a fault we work around, which the user should still see (logging may be off)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---- manifests and local folders -------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(ckpt_dir: Path, step: int) -> dict:
    # The manifest's temp file is no checkpoint file: a kill while writing it leaves it behind.
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name not in (MANIFEST, f".{MANIFEST}.tmp"))
    entries = [{"path": p.relative_to(ckpt_dir).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
               for p in files]
    return {"format": 1, "step": step, "files": entries}


def write_local_manifest(ckpt_dir: Path, manifest: dict) -> None:
    tmp = ckpt_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, ckpt_dir / MANIFEST)  # atomic: a reader sees the old or the new manifest, never half


def local_checkpoints(output_dir: Path) -> dict[int, Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    found = {int(m.group(1)): p for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))}
    return dict(sorted(found.items()))


def manifest_problem(ckpt_dir: Path, manifest: dict, verify_hashes: bool) -> str | None:
    """What in the folder differs from the manifest (a file missing, its size or its hash), or None."""
    for entry in manifest["files"]:
        path = ckpt_dir / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{entry['path']} has {path.stat().st_size} bytes, {MANIFEST} says {entry['size']}"
        if verify_hashes and sha256_file(path) != entry["sha256"]:
            return f"{entry['path']} does not match its sha256 in {MANIFEST}"
    return None


def read_local_manifest(ckpt_dir: Path, verify_hashes: bool) -> dict | None:
    """The folder's manifest if every file it lists is there with that size (and hash)."""
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
        if manifest_problem(ckpt_dir, manifest, verify_hashes) is None:
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def safetensors_intact(path: Path) -> bool:
    """The header's last tensor must end exactly at the end of the file (catches truncation)."""
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        return 8 + header_len + max(ends, default=0) == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return False


def trainer_save_problem(ckpt_dir: Path, step: int) -> str | None:
    """Completeness without a manifest: Trainer writes trainer_state.json after weights, optimizer and RNG."""
    try:
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "no readable trainer_state.json (killed while saving?)"
    if state.get("global_step", step) != step:
        return f"its trainer_state.json is for step {state.get('global_step')}"
    if not any((ckpt_dir / n).is_file() for n in WEIGHT_FILES):
        return f"no weights file ({WEIGHT_FILES[0]})"
    cut = [p.name for p in sorted(ckpt_dir.glob("*.safetensors")) if not safetensors_intact(p)]
    # torch.save writes zip archives; a cut-short one lacks its end-of-central-directory record.
    cut += [p.name for ext in ("*.pt", "*.pth", "*.bin") for p in sorted(ckpt_dir.glob(ext)) if not zipfile.is_zipfile(p)]
    return f"{cut[0]} is cut short" if cut else None


def saved_by_trainer(ckpt_dir: Path, step: int) -> bool:
    return trainer_save_problem(ckpt_dir, step) is None


def local_problem(ckpt_dir: Path, step: int, verify_hashes: bool = True) -> str | None:
    """Why a local checkpoint folder cannot be resumed from, or None if it is complete."""
    if not (ckpt_dir / MANIFEST).exists():
        return trainer_save_problem(ckpt_dir, step)
    try:
        return manifest_problem(ckpt_dir, json.loads((ckpt_dir / MANIFEST).read_text()), verify_hashes)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({first_line(err)})"


def local_is_complete(ckpt_dir: Path, step: int, verify_hashes: bool = True) -> bool:
    return local_problem(ckpt_dir, step, verify_hashes) is None


# ---- the remote ----------------------------------------------------------------
class RemoteStore:
    """`<uri>/checkpoint-<step>/...` on any fsspec filesystem (s3:// in practice)."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, step: int, rel: str = "") -> str:
        return f"{self.root}/checkpoint-{step}" + (f"/{rel}" if rel else "")

    def _sizes(self, prefix: str) -> dict[str, int]:
        """Size of every object under `prefix`, keyed by path relative to the root."""
        self.fs.invalidate_cache()  # s3fs caches listings; we need the server's view now
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as err:
            raise unavailable(f"cannot list {self.uri}", err) from err
        return {p[len(self.root) + 1:]: info["size"] for p, info in found.items()}

    @staticmethod
    def _matches(manifest: dict | None, step: int, sizes: dict[str, int]) -> bool:
        files = manifest["files"] if manifest else ()
        return bool(files) and all(sizes.get(f"checkpoint-{step}/{e['path']}") == e["size"] for e in files)

    def complete_steps(self) -> dict[int, dict]:
        """step -> manifest, for checkpoints whose manifest lists exactly-sized files that exist."""
        sizes = self._sizes(self.root)  # one listing for all checkpoints
        steps = {int(m.group(1)) for key in sizes
                 if (m := re.fullmatch(rf"checkpoint-(\d+)/{re.escape(MANIFEST)}", key))}
        manifests = {step: self.read_manifest(step) for step in sorted(steps)}
        return {step: m for step, m in manifests.items() if self._matches(m, step, sizes)}

    def is_complete(self, step: int, manifest: dict) -> bool:
        """True when the remote holds exactly this manifest and files of its sizes."""
        return self.read_manifest(step) == manifest and self._matches(manifest, step, self._sizes(self.path(step)))

    def read_manifest(self, step: int) -> dict | None:
        try:
            manifest = json.loads(self.fs.cat_file(self.path(step, MANIFEST)))
        except (FileNotFoundError, ValueError):
            return None
        except Exception as err:  # the server gone since the listing: as unknown as a failed listing
            raise unavailable(f"cannot read {self.uri}/checkpoint-{step}/{MANIFEST}", err) from err
        valid = isinstance(manifest, dict) and manifest.get("step") == step and isinstance(manifest.get("files"), list)
        return manifest if valid else None

    def upload(self, ckpt_dir: Path, step: int, manifest: dict) -> None:
        self.drop_manifest(step)  # first: while files are replaced, the checkpoint must read as incomplete
        for entry in manifest["files"]:
            self.fs.put_file(str(ckpt_dir / entry["path"]), self.path(step, entry["path"]))
        self.fs.pipe_file(self.path(step, MANIFEST), json.dumps(manifest, indent=1).encode())

    def drop_manifest(self, step: int) -> None:
        """The checkpoint then reads as incomplete: never resumed from, and replaced by its next upload."""
        try:
            self.fs.rm_file(self.path(step, MANIFEST))
        except FileNotFoundError:
            pass

    def delete(self, step: int) -> None:
        self.drop_manifest(step)  # first, so a half-deleted folder reads as incomplete
        self.fs.rm(self.path(step), recursive=True)


def newest(steps, count: int) -> set[int]:
    return set(sorted(steps)[-count:]) if count > 0 else set()


# ---- the Trainer callback ------------------------------------------------------
class CheckpointSync(TrainerCallback):
    """Uploads each saved checkpoint from a background thread, retrying until the remote answers.

    remote_uri None: no upload; the callback still writes local manifests and prunes.
    max_retries: consecutive failures after which the uploader parks until the next save
    (None: keep retrying every backoff_max seconds). drain_timeout bounds on_train_end's wait.
    """

    def __init__(self, output_dir: str | Path, remote_uri: str | None, storage_options: dict | None = None,
                 keep: int = 2, protect_steps: set[int] | None = None, max_retries: int | None = None,
                 backoff_initial: float = 2.0, backoff_max: float = 60.0, drain_timeout: float = 600.0):
        if keep < 1:
            raise ValueError("keep must be >= 1: the newest checkpoint is what a resume needs")
        self.output_dir = Path(output_dir)
        self.remote_uri, self.storage_options = remote_uri, dict(storage_options or {})
        self.keep, self.protect_steps = keep, set(protect_steps or ())
        self.max_retries, self.backoff_initial, self.backoff_max = max_retries, backoff_initial, backoff_max
        self.drain_timeout = drain_timeout
        self.uploaded: list[int] = []  # steps in upload order, for logs and tests
        self.failed_attempts = 0  # drains that stopped on an error, over the whole run
        self._pending: set[int] = set()
        self._damaged: set[int] = set()  # local folders whose bytes fail their manifest: never uploaded or counted
        self._lock = threading.Lock()
        self._wake, self._idle = threading.Event(), threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Creating the filesystem does no I/O, so this is safe with the server down.
        self._store = RemoteStore(remote_uri, self.storage_options) if remote_uri else None

    # -- Trainer hooks (training thread: cheap, never wait on the network) --
    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if getattr(args, "save_total_limit", None):
            logger.warning("save_total_limit=%s also deletes checkpoints, maybe before their upload; "
                           "set it to None and let CheckpointSync(keep=...) prune", args.save_total_limit)
        self.upload_leftovers()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt_dir = self.output_dir / f"checkpoint-{state.global_step}"
        if not ckpt_dir.is_dir():
            logger.warning("on_save: %s does not exist (output_dir mismatch?), nothing to upload", ckpt_dir)
            return
        # A resumed run may overwrite this step's folder: its old manifest no longer describes it.
        (ckpt_dir / MANIFEST).unlink(missing_ok=True)
        with self._lock:
            self._damaged.discard(state.global_step)  # saved anew
        self.enqueue(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.finish()

    # -- also called directly by a run with nothing left to train --
    def upload_leftovers(self) -> None:
        """Queue every complete local checkpoint: a previous run may have died before uploading its last ones.

        Hashes are checked here, once a run. A folder whose bytes no longer match its manifest (the resume skipped
        it) would reach the remote under a manifest vouching for other bytes, and count among the newest `keep`,
        so pruning could delete the good checkpoint the run resumed from: it is left alone, and training saves
        that step again."""
        done = []
        for step, ckpt_dir in local_checkpoints(self.output_dir).items():
            if not local_is_complete(ckpt_dir, step, verify_hashes=False):
                continue  # cut short while saving: never counted, as before
            if (problem := local_problem(ckpt_dir, step, verify_hashes=True)) is not None:
                warn(f"{ckpt_dir} is damaged ({problem}); not uploading it, nor counting it when pruning")
                with self._lock:
                    self._damaged.add(step)
                continue
            done.append(step)
        self.enqueue(*done)

    def finish(self) -> None:
        """Wait up to drain_timeout for the uploads, then stop the uploader; one line names what is left."""
        if not self.wait_idle(self.drain_timeout):
            left = ", ".join(f"checkpoint-{s}" for s in sorted(self._pending))
            warn(f"upload to {self.remote_uri} not finished after {self.drain_timeout:.0f}s: {left} stay in "
                 f"{self.output_dir}; the next run of the train stage uploads them (dvc repro -f -s train)")
        self.close()

    # -- queue --
    def enqueue(self, *steps: int) -> None:
        with self._lock:
            self._pending.update(steps)
            if self._pending:
                self._idle.clear()
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False  # close() joined the old thread, so no one else reads this now
                self._thread = threading.Thread(target=self._run, name="checkpoint-sync", daemon=True)
                self._thread.start()
        self._wake.set()  # also retries the backlog now instead of after the backoff

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending (waking the uploader from its backoff); False on timeout."""
        if not self._idle.is_set():
            self._wake.set()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the uploader thread (what is still pending stays on local disk)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stopping:
            failure = self._drain()
            if failure is None:
                failures = 0
                self._wake.wait()
            else:
                failures += 1
                self.failed_attempts += 1
                parked = self.max_retries is not None and failures >= self.max_retries
                delay = None if parked else min(self.backoff_initial * 2 ** (failures - 1), self.backoff_max)
                warn(f"{failure} (attempt {failures}); it stays in {self.output_dir} and is uploaded whole later, "
                     + ("at the next save" if parked else f"retrying in {delay:.1f}s"))
                self._wake.wait(delay)
            self._wake.clear()

    def _drain(self) -> str | None:
        """Upload pending steps, oldest first; at the first error return it (the rest wait for the retry)."""
        while True:
            with self._lock:
                step = min(self._pending, default=None)
            if step is None:
                break
            try:
                self._sync_one(step)
            except Exception as err:  # the network or the server: keep training, retry later
                return f"upload of checkpoint-{step} to {self.remote_uri} failed: {first_line(err)}"
            with self._lock:
                self._pending.discard(step)
        try:
            self._prune()
        except Exception as err:  # pruning is housekeeping: the next drain tries again
            logger.warning("checkpoint pruning failed: %s", first_line(err))
        with self._lock:
            if not self._pending:
                self._idle.set()
        return None

    def _sync_one(self, step: int) -> None:
        ckpt_dir = self.output_dir / f"checkpoint-{step}"
        manifest = read_local_manifest(ckpt_dir, verify_hashes=False)
        if manifest is None:
            if not saved_by_trainer(ckpt_dir, step):  # e.g. deleted by save_total_limit
                logger.error("checkpoint-%d is missing or incomplete locally; not uploading it", step)
                return
            manifest = build_manifest(ckpt_dir, step)
            write_local_manifest(ckpt_dir, manifest)
        if self._store is None:
            return
        if self._store.is_complete(step, manifest):
            return  # already there, e.g. queued again by on_train_begin
        self._store.upload(ckpt_dir, step, manifest)
        self.uploaded.append(step)
        logger.info("checkpoint-%d uploaded to %s", step, self._store.path(step))

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints plus protect_steps, on each side.

        A local folder goes only when its remote copy is complete (or there is no remote).
        """
        remote = self._store.complete_steps() if self._store else {}
        for step in set(remote) - newest(remote, self.keep) - self.protect_steps:
            self._store.delete(step)
            logger.info("pruned remote checkpoint-%d", step)
        with self._lock:
            damaged = set(self._damaged)
        local = {s: d for s, d in local_checkpoints(self.output_dir).items()
                 if s not in damaged and local_is_complete(d, s, verify_hashes=False)}
        with self._lock:
            kept = newest(local, self.keep) | self.protect_steps | self._pending
        for step, ckpt_dir in local.items():
            if step not in kept and (self._store is None or step in remote):
                shutil.rmtree(ckpt_dir, ignore_errors=True)
                logger.info("pruned local %s", ckpt_dir)


# ---- resume ----------------------------------------------------------------------
def newest_local_checkpoint(output_dir: str | Path) -> tuple[Path, int] | None:
    """(folder, step) of the newest local checkpoint that verifies; each newer one is reported and skipped."""
    for step, ckpt_dir in reversed(local_checkpoints(Path(output_dir)).items()):
        problem = local_problem(ckpt_dir, step)
        if problem is None:
            return ckpt_dir, step
        warn(f"{ckpt_dir} is incomplete or damaged ({problem}); skipping it")
    return None


def latest_complete_checkpoint(output_dir: str | Path, remote_uri: str | None,
                               storage_options: dict | None = None) -> tuple[str, int] | None:
    """(location, step) of the newest complete checkpoint: a local path, or the remote URI of the folder.

    Local wins a tie (no download). Damaged local folders are reported and skipped; remote ones
    count when their files have the manifest's sizes (hashes are checked by the download).
    Raises RemoteUnavailable if the remote cannot be listed: silently restarting from an
    older checkpoint (or from scratch) would throw away work.
    """
    local = newest_local_checkpoint(output_dir)
    best_local = (str(local[0]), local[1]) if local else None
    if remote_uri:
        store = RemoteStore(remote_uri, storage_options)
        step = max(store.complete_steps(), default=None)
        if step is not None and (best_local is None or step > best_local[1]):
            return f"{store.uri}/checkpoint-{step}", step
    return best_local


def remove_dead_partials(dest_dir: Path, step: int) -> None:
    """Delete the hidden download folders of fetches whose process died (kill -9): each is named by its pid, so
    no later fetch would reuse or remove it, and it would sit in the DVC-tracked checkpoints folder for good."""
    for folder in dest_dir.glob(f".checkpoint-{step}.partial-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def fetch_checkpoint(remote_uri: str, step: int, dest_dir: str | Path, storage_options: dict | None = None) -> Path:
    """Download `<remote>/checkpoint-<step>` into `dest_dir/checkpoint-<step>`, verified against its manifest.

    Downloads into a per-process hidden folder first, so a failed fetch never leaves a half checkpoint.
    """
    store = RemoteStore(remote_uri, storage_options)
    manifest = store.read_manifest(step)
    if manifest is None:
        raise ChecksumError(f"{store.path(step)}: no valid {MANIFEST}, checkpoint is incomplete")
    target = Path(dest_dir) / f"checkpoint-{step}"
    if read_local_manifest(target, verify_hashes=True) == manifest:
        return target  # already here, e.g. fetched by the main process first
    remove_dead_partials(Path(dest_dir), step)
    partial = Path(dest_dir) / f".checkpoint-{step}.partial-{os.getpid()}"
    try:
        for entry in manifest["files"]:
            local = partial / entry["path"]
            local.parent.mkdir(parents=True, exist_ok=True)
            store.fs.get_file(store.path(step, entry["path"]), str(local))
            size, digest = local.stat().st_size, sha256_file(local)
            if size != entry["size"] or digest != entry["sha256"]:
                raise ChecksumError(f"{entry['path']}: got {size} bytes sha256 {digest[:12]}, "
                                    f"its manifest says {entry['size']} bytes sha256 {entry['sha256'][:12]}")
        write_local_manifest(partial, manifest)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete local copy of the same step
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resume_path(output_dir: str | Path, remote_uri: str | None, storage_options: dict | None = None) -> str | None:
    """What to pass to trainer.train(resume_from_checkpoint=...): the newest checkpoint that verifies, local path.

    Remote checkpoints newer than the newest good local one are fetched newest first; one that fails
    its hashes is reported, loses its manifest (so a rerun does not trip over it and the next upload of
    its step replaces it) and is skipped. None: no checkpoint verifies, train from scratch.
    """
    local = newest_local_checkpoint(output_dir)
    local_step = local[1] if local else 0
    if remote_uri:
        store = RemoteStore(remote_uri, storage_options)
        for step in sorted((s for s in store.complete_steps() if s > local_step), reverse=True):
            try:
                logger.info("resuming from %s (newer than any local checkpoint); downloading", store.path(step))
                return str(fetch_checkpoint(remote_uri, step, output_dir, storage_options))
            except ChecksumError as err:
                warn(f"{store.uri}/checkpoint-{step} failed to verify ({err}); skipping it")
                with contextlib.suppress(Exception):  # e.g. read-only credentials: it is skipped anyway
                    store.drop_manifest(step)
            except Exception as err:  # the network or the server, as for a listing
                raise unavailable(f"cannot download {store.uri}/checkpoint-{step}", err) from err
    return str(local[0]) if local else None
