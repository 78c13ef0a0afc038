"""Small I/O helpers every stage shares: all-or-nothing outputs, jsonl, and one-line errors for bad input."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a scratch folder beside `out_dir`; it replaces `out_dir` only if the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; outputs are meant to be shared
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        filename = getattr(err, "filename", None)
        if _disk_full(err) and (filename is None or str(filename).startswith(str(tmp))):
            # name the declared output, not the scratch folder that is already gone
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir)) from err
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is renamed to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _disk_full(err) and getattr(err, "filename", None) in (None, str(tmp)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    os.replace(tmp, path)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as err:
        if err.filename is None:  # a failed write() names no file; say which one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def read_jsonl(path: Path, fix: str = "delete the file and rerun the stage that writes it",
               keys: tuple[str, ...] = ()) -> list[dict]:
    """Every row of a jsonl file; a bad line (not JSON, not an object, or lacking one of `keys`) raises
    ValueError naming `path:line` and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the stage that writes it first (dvc repro)")
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not valid JSON ({err.msg}); {fix}") from None
                missing = [key for key in keys if not isinstance(row, dict) or key not in row]
                if missing:
                    raise ValueError(f"{path}:{number} lacks {json.dumps(missing[0])}; {fix}")
                rows.append(row)
    return rows


def read_stage_json(path: Path, stage: str, keys: tuple[str, ...] = ()):
    """A stage's JSON output; missing, unreadable or lacking one of `keys` is a ValueError naming the file and the
    stage to rerun (`stage` writes it)."""
    if not path.is_file():
        raise ValueError(f"{path} not found; the {stage} stage writes it (dvc repro)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun the {stage} stage (dvc repro)") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing[0]!r}; it is out of date, rerun the {stage} stage (dvc repro)")
    return data


def write_json(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


# What to do about an OS error, by errno; the message already names the path.
OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or write the outputs to another disk, then rerun",
    errno.EDQUOT: "the disk quota is used up: free space there, then rerun",
    errno.EACCES: "make it writable for this user (chmod/chown) or use another folder",
    errno.EPERM: "make it writable for this user (chmod/chown) or use another folder",
    errno.EROFS: "the filesystem is read-only; write the outputs to a writable disk",
}


def _disk_full(err: BaseException) -> bool:
    """ENOSPC, also when it arrives wrapped by a library that drops the errno (safetensors: "os error 28")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(err)


def error_message(err: BaseException) -> str:
    """One line for an expected failure: ours carry their own message; an OS error gets its path and the fix."""
    if isinstance(err, OSError) and err.errno is not None:
        where = f"{err.filename}: " if err.filename is not None else ""
        fix = OS_FIXES.get(err.errno)
        return f"{where}{err.strerror or os.strerror(err.errno)}" + (f"; {fix}" if fix else "")
    return first_line(err)


def first_line(err: BaseException) -> str:
    """The error's message, cut to its first line (a library's multi-line text would break the one-line rule)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextlib.contextmanager
def fail() -> Iterator[None]:
    """Turn an expected failure (a bad param, path or file, or the OS refusing: disk full, permissions) into one
    `error:` line and exit status 1. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, OSError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        raise SystemExit(1) from None


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; reaps it first if it is our own exited child (else it stays a zombie)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
