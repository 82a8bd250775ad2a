"""``spillover serve`` as a subprocess: started on a free port, waited for until it listens, stopped with SIGTERM.

The HTTP benchmark (``bench.http_concurrency``) and the server's process tests both drive the real server through
this one class. It knows the server is listening from the line the server prints on stderr
(``compute.serve.main.READY_PATTERN``, which holds the URL), and it never talks HTTP itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ServeProcess:
    """``python -m compute.cli serve ARGS --port 0``, its stderr in ``log_path`` (a temporary file, removed on exit,
    when None); ``env`` is added to this process's environment. A context manager that stops it (SIGTERM, then
    SIGKILL after 60 s); the server stops its loader itself."""

    def __init__(
        self, args: list[str], *, log_path: Path | None = None, env: dict[str, str] | None = None, timeout_s: float = 600
    ):
        self._own_log = log_path is None
        self.log_path = Path(tempfile.mkstemp(prefix="spillover-serve-", suffix=".log")[1]) if log_path is None else Path(log_path)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "compute.cli", "serve", *args, "--port", "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.url = self._wait_ready(timeout_s)  # http://HOST:PORT
        self.base_url = self.url + "/v1"

    def _wait_ready(self, timeout_s: float) -> str:
        from compute.serve.main import READY_PATTERN  # here, not at import: the server's packages load with it

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = READY_PATTERN.search(self.log())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"spillover serve exited with {self.process.returncode} before listening:\n"
                                   f"{self.log()[-3000:]}")  # fmt: skip
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"spillover serve did not listen within {timeout_s:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        """What the server wrote on stderr so far."""
        return self.log_path.read_text(errors="replace")

    def loader_pid(self) -> int | None:
        """The pid of the loader the server started (``python -m loader.main``), or None when there is none."""
        import psutil

        for child in psutil.Process(self.process.pid).children():
            if "loader.main" in child.cmdline():
                return child.pid
        return None

    def stop(self) -> int:
        """Stop the server if it runs; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
