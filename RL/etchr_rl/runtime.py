"""Run-time helpers of the RL tree: rank-0 handling, logging, metrics.jsonl, wandb, progress.

Each tree keeps its own copy of this small module (DESIGN.md: the trees share files on disk, never
code); the copies are tested against the same behaviour in each tree's tests.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Ranks. Read from the launcher's environment so this works before/without torch.distributed.
# ----------------------------------------------------------------------------------------------
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, flushed (logs of multi-process runs interleave otherwise)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    """Synchronise ranks when torch.distributed is initialised; a no-op otherwise."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def get_logger(name: str = "etchr_rl") -> logging.Logger:
    """A logger that prints INFO on rank 0 and only WARNING+ on the other ranks, with a rank tag."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        tag = f"[rank{rank()}] " if world_size() > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main() else logging.WARNING)
    return logger


# ----------------------------------------------------------------------------------------------
# Files: write to a temp file in the same folder, then rename, so no reader sees half a file.
# ----------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets as it reads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: str | os.PathLike) -> None:
    """Give every file under `root` mode 0666 & ~umask and every folder 0777 & ~umask: safetensors'
    save_file and mkdtemp create 0600 / 0700, which a colleague on a shared filesystem cannot read."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, (0o777 if root.is_dir() else 0o666) & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a colleague must be able to read results
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# One live writer per run dir, and workers that die with their launcher (same as Evaluation's copy).
# ----------------------------------------------------------------------------------------------
class RunDirLocked(RuntimeError):
    """Another live process holds the run dir; the message names its pid and host."""


class RunDirLock:
    """An advisory lock on `<run_dir>/.lock` (fcntl.flock), held for the life of the process.

    The kernel releases it when the holder dies (kill -9 included), so a stale lock never blocks a
    rerun. The holder's pid, host and start time are written into the file for the error message.
    A run dir this lock created and that holds nothing but the lock at release (a start that failed before
    writing anything) is removed again, so a failed start leaves no run dir behind.
    Only rank 0 of a launched run takes it (the other ranks share the run).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> "RunDirLock":
        import fcntl
        import socket

        created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown holder"
            os.close(fd)
            raise RunDirLocked(f"{self.path.parent}: another training or evaluation is writing here ({holder}); "
                               "wait for it, stop it, or use another train.run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
        self._fd, self._created = fd, created
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._created and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
                self.path.unlink()  # still holding the flock: nobody else is inside
                self.path.parent.rmdir()
        except OSError:  # something appeared meanwhile: keep the dir
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG).

    torchrun starts its workers in their own process groups, so killing the launcher's group would
    leave them running (and racing a rerun). Called at start-up by launched workers; returns False
    where the call does not exist.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    return True


def launched() -> bool:
    """Started by torchrun / accelerate launch (they set LOCAL_RANK and WORLD_SIZE)?"""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def git_sha(default: str = "unknown") -> str:
    """The commit of the checkout this code runs from (recorded in results and meta.json)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else default
    except (OSError, subprocess.SubprocessError):
        return default


# ----------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl always (rank 0), wandb when enabled (WANDB_MODE=offline in tests).
# ----------------------------------------------------------------------------------------------
class MetricsWriter:
    """Appends one JSON object per `log` call to `<run_dir>/metrics.jsonl`; mirrors to wandb if asked.

    Only rank 0 writes. Each line carries `step` and wall-clock `time`; values must be JSON numbers,
    strings or bools (tensors are converted with float()).

    Resume (`resume_step`: the step the trainer resumed at, 0 for a fresh start): rows with a larger step
    were logged after that checkpoint by an attempt that died; they move to `metrics.superseded.jsonl`
    before appending starts, so metrics.jsonl lists each step once, with the values of the attempt that
    continued. `resume_step=None` (Evaluation, ad-hoc use) only appends. wandb: the run id is kept in
    `<run_dir>/wandb_id.txt` and every attempt resumes that run (resume="allow"); an online run keeps the
    values it first received for the replayed steps (wandb ignores a step below its current one), so
    metrics.jsonl is the authority.
    """

    SUPERSEDED = "metrics.superseded.jsonl"
    WANDB_ID = "wandb_id.txt"

    def __init__(self, run_dir: str | os.PathLike, *, wandb_enabled: bool = False,
                 wandb_project: str = "etchr", wandb_run_name: str | None = None,
                 config: dict | None = None, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._file = None
        self.dropped = 0  # rows moved to metrics.superseded.jsonl by this writer
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path)  # a kill -9 mid-write leaves half a row; appending after it would glue two
        if resume_step is not None:
            self.dropped = drop_rows_after(self.path, int(resume_step), self.path.with_name(self.SUPERSEDED))
        self._file = open(self.path, "a", encoding="utf-8")
        if wandb_enabled:
            import wandb  # imported lazily: optional at run time

            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config,
                                     dir=str(Path(run_dir)), id=wandb_run_id(run_dir), resume="allow")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._file is None:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            row[key] = value
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wandb_run_id(run_dir: str | os.PathLike) -> str:
    """The wandb run id of this run dir: read from `<run_dir>/wandb_id.txt`, or made and written there on the
    first call, so that every attempt of a resumed run logs to the same wandb run."""
    path = Path(run_dir) / MetricsWriter.WANDB_ID
    if path.is_file():
        run_id = path.read_text(encoding="utf-8").strip()
        if not run_id or not all(c.isalnum() or c in "-_" for c in run_id):
            raise ValueError(f"{path}: {run_id!r} is not a wandb run id (letters, digits, - and _); "
                             "delete the file to start a new wandb run")
        return run_id
    import secrets

    run_id = secrets.token_hex(4)  # 8 characters, as wandb's own ids
    atomic_write_text(path, run_id + "\n")
    return run_id


def drop_rows_after(path: str | os.PathLike, step: int, superseded: str | os.PathLike) -> int:
    """Remove the rows of a metrics.jsonl whose `step` is above `step`, appending them (as they were) to
    `superseded`; returns how many moved. The kept lines are rewritten byte for byte through a temp file
    and a rename, so a kill during the cut leaves the old file or the new one, never a mix. A row that is
    not JSON is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, drop = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise ValueError(f"{path}: line {n} is not a JSON object ({exc})") from None
            (drop if isinstance(row_step, (int, float)) and row_step > step else keep).append(line)
    if not drop:
        return 0
    with open(superseded, "ab") as f:  # first: a kill between the two writes loses nothing
        f.writelines(drop)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_bytes(path, b"".join(keep))
    return len(drop)


def cut_torn_tail(path: str | os.PathLike) -> int:
    """Truncate a JSONL file after its last newline (drops a row torn by a kill mid-write); returns the
    number of bytes cut (0 when the file ends with a newline or does not exist)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            f.seek(max(0, end - 65536))
            chunk = f.read(end - max(0, end - 65536))
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = max(0, end - len(chunk)) + nl + 1
                break
            end = max(0, end - len(chunk))
        if end < size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        return size - end


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl. An unterminated last line (a row being written, or torn by a kill)
    is left out; a broken line elsewhere is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail: what follows the last newline ("" when none)
    rows = []
    for n, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {n} is not JSON ({exc})") from None
    if tail.strip():
        try:
            rows.append(json.loads(tail))
        except json.JSONDecodeError:
            pass  # torn or still being written
    return rows


# ----------------------------------------------------------------------------------------------
# Progress: tqdm with rate and ETA on rank 0, silent elsewhere.
# ----------------------------------------------------------------------------------------------
def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0) -> Iterator[T]:
    """A tqdm bar showing count, rate and ETA; disabled on ranks other than 0.

    In a non-interactive log (CI, nohup) the bar still prints, at most every 5 seconds.
    """
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not is_main(),
                dynamic_ncols=True, mininterval=0.1 if interactive else 5.0,
                bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
