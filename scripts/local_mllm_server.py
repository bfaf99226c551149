#!/usr/bin/env python
"""Start and stop a real OpenAI-compatible MLLM server on this machine: `transformers serve`.

Used by the demo and by the tests (root conftest.py, a pytest session fixture). The server binds
127.0.0.1 on a free port, is waited for until /health answers (or a timeout, with the server's log in
the error), and is stopped by its process group, so no process is left behind, also when a test fails
or the caller is interrupted.

    python scripts/local_mllm_server.py --model tiny_models/qwen3-vl-tiny     # serve until Ctrl-C

In Python:
    with LocalMLLMServer("tiny_models/qwen3-vl-tiny") as srv:
        srv.base_url   # "http://127.0.0.1:PORT/v1"
        srv.model      # the model name requests must carry (the served path)

The model folder may be given relative to the working directory or absolute. `transformers serve` pins
the path it is started with as the served name, so the server is started from the repository root with
the folder's path relative to it when the folder lies inside the checkout ("tiny_models/qwen3-vl-tiny",
what configs write as mllm.model, from any working directory), else with its absolute path.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM if its parent dies, even by SIGKILL (no orphaned servers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class ServerStartError(RuntimeError):
    pass


REPO_ROOT = Path(__file__).resolve().parents[1]


def served_name(model_dir: str | os.PathLike, root: str | os.PathLike = REPO_ROOT) -> str:
    """The name the server pins for `model_dir` (relative to the cwd or absolute): its path relative to
    `root` when it lies inside it, else its absolute path."""
    path, root = Path(os.path.abspath(model_dir)), Path(os.path.abspath(root))  # ".." folded, links kept
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


class LocalMLLMServer:
    """`transformers serve MODEL` on 127.0.0.1:PORT in its own process group."""

    def __init__(self, model_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                 device: str = "cpu", startup_timeout_s: float = 180.0, log_path: str | os.PathLike | None = None,
                 root: str | os.PathLike = REPO_ROOT):
        self.root = os.path.abspath(root)  # the server's working directory
        self.model_dir = os.path.abspath(model_dir)
        self.served = served_name(self.model_dir, self.root)
        if not Path(self.model_dir, "config.json").is_file():
            raise FileNotFoundError(f"no model at {self.model_dir} (config.json missing); "
                                    "build one with scripts/make_tiny_models.py --out DIR")
        self.host = host
        self.port = port or free_port(host)
        self.device = device
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="mllm-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    # The name clients must send: transformers serve pins the served model and rejects other names.
    @property
    def model(self) -> str:
        return self.served

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "LocalMLLMServer":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.served,
               "--device", self.device, "--host", self.host, "--port", str(self.port), "--log-level", "warning"]
        log = open(self.log_path, "ab")
        # New session = own process group: stop() kills the server and anything it spawned.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, cwd=self.root,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        log.close()
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"transformers serve exited with code {self.proc.returncode} before it was "
                                       f"ready; log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise ServerStartError(f"transformers serve not ready on {url} after {self.startup_timeout_s:.0f} s; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after timeout_s; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover
            pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # children that outlived the leader, too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass

    def __enter__(self) -> "LocalMLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve a (tiny) Qwen3-VL with transformers serve on 127.0.0.1.")
    ap.add_argument("--model", required=True, help="model folder, relative to the working directory or absolute "
                    "(e.g. tiny_models/qwen3-vl-tiny); served as its path from the repository root when inside it")
    ap.add_argument("--port", type=int, default=None, help="default: a free port")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    srv = LocalMLLMServer(args.model, host=args.host, port=args.port).start()
    print(f"serving {srv.model} at {srv.base_url} (pid {srv.pid}); Ctrl-C stops it", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
