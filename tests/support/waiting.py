"""Waiting on a condition instead of sleeping a fixed time."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not come true in time; the message says what was waited for."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `predicate()` until it returns something truthy, and return that. An exception from the
    predicate ends the wait at once (a predicate fails fast by raising, e.g. when a process it
    waits on has died); after `timeout` seconds, WaitTimeout names `what` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def while_running(process: subprocess.Popen[str], predicate: Callable[[], T]) -> Callable[[], T]:
    """`predicate`, failing at once (with the process's last output) when `process` has ended."""

    def check() -> T:
        value = predicate()
        if not value and process.poll() is not None:
            output = process.stdout.read()[-3000:] if process.stdout else ""
            raise AssertionError(f"process ended early ({process.returncode}): {output}")
        return value

    return check


class ProcessOutput:
    """Collects a running process's stdout and stderr (text pipes) in threads, so that a test can wait
    for a line while the process runs and still get all the output at the end."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self._out: list[str] = []
        self._err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(pipe, into), daemon=True)
            for pipe, into in ((process.stdout, self._out), (process.stderr, self._err))
            if pipe
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(pipe: IO[str], into: list[str]) -> None:
        for line in pipe:
            into.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    def wait_for_stdout(self, text: str, timeout: float) -> None:
        """Until `text` is in the process's stdout; fails at once if the process ended without it."""

        def seen() -> bool:
            if text in self.stdout:
                return True
            if self.process.poll() is not None:
                out, err = self.communicate(10)
                raise AssertionError(
                    f"process ended ({self.process.returncode}) without printing {text!r}:\n"
                    f"{out[-3000:]}\n{err[-3000:]}"
                )
            return False

        wait_for(seen, timeout, f"{text!r} on stdout (so far: {self.stdout[-500:]!r})")

    def communicate(self, timeout: float) -> tuple[str, str]:
        """Wait for the process to exit; (all of stdout, all of stderr)."""
        self.process.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        return "".join(self._out), "".join(self._err)
