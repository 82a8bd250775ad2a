"""Starting, watching and stopping the loader process for ``spillover run`` (when no ``--connect`` is given).

``LaunchedLoader.start(command)`` creates a private run directory (mode 0700, so only this user can reach
the ``ipc://`` socket inside it), starts the loader (``python -m loader.main``, the ``protocol.launch.LoaderCommand``
given, with its socket and ready file in that directory) as a child process, and waits for the ready file while checking, every few milliseconds, that the loader is still
alive: a loader that refuses its budget or crashes is reported at once with its exit code, never waited on.
It is a context manager: leaving it, normally, on an error or on Ctrl-C, stops the loader (SIGTERM, then
SIGKILL after a grace period) and removes the run directory.

The loader runs in its own session, so a Ctrl-C typed at the terminal reaches compute only (where it stops
the current reply) and not the loader; the loader in turn exits by itself if this process dies.
Its standard output goes to our standard error: compute's stdout carries only the reply (or the JSON).

This module starts the loader by its command line (``protocol.launch``); it does not import ``loader``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol.launch import LoaderCommand, ReadyFile

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often the ready file and the loader's liveness are checked
STOP_GRACE_S = 10.0  # how long the loader gets to free its memory after SIGTERM before SIGKILL


class LoaderStartError(RuntimeError):
    """The loader exited before it was ready (its own message is on stderr above ours)."""


class LaunchedLoader:
    """A running loader child process and its private run directory."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, address: str):
        self.process = process
        self.run_dir = run_dir
        self.address = address  # the ZeroMQ address the loader listens on (ipc:// inside run_dir)

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, command: LoaderCommand) -> "LaunchedLoader":
        """Start the loader ``command`` describes (its socket and ready file are chosen here) and wait until it is
        ready (as long as it stays alive)."""
        run_dir = Path(tempfile.mkdtemp(prefix="spillover-"))  # mkdtemp makes it 0700
        address = f"ipc://{run_dir / 'loader.sock'}"
        ready_file = run_dir / "ready.json"
        command = dataclasses.replace(command, socket=address, ready_file=ready_file)
        argv = [sys.executable, "-m", "loader.main", *command.argv()]
        log.info("starting the loader: %s", " ".join(argv))
        try:
            # The loader's stdout goes to our stderr (fd 2): compute's stdout is the reply's alone.
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=2, start_new_session=True)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        loader = cls(process, run_dir, address)
        try:
            loader._wait_ready(ready_file)
        except BaseException:
            loader.stop()
            raise
        return loader

    def _wait_ready(self, ready_file: Path) -> None:
        started = time.monotonic()
        while not ready_file.exists():
            code = self.process.poll()
            if code is not None:
                raise LoaderStartError(f"the loader (pid {self.pid}) exited with code {code} before it was ready")
            time.sleep(POLL_S)
        # The loader writes the file atomically, and its address is the one to connect to.
        self.address = ReadyFile.read(ready_file).address
        log.info("loader (pid %d) ready after %.1f s", self.pid, time.monotonic() - started)

    def exit_code(self) -> int | None:
        """None while the loader runs, else its exit code (negative: killed by that signal)."""
        return self.process.poll()

    def stop(self) -> None:
        """Stop the loader if it still runs, and remove the run directory. Safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("the loader (pid %d) ignored SIGTERM for %.0f s: killing it", self.pid, STOP_GRACE_S)
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "LaunchedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
