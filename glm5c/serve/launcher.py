"""Run `glm5c serve` as a subprocess and wait until it is ready: for `glm5c bench serve`, tests,
and anyone scripting a server. The supervisor's log lines go to `log` (and are kept in `lines`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

_READY = re.compile(r"ready (?:again )?on (tcp://\S+) \(pids: ([^;)]*)")


class ServerProcess:
    def __init__(self, args: list[str], start_timeout_s: float = 300.0, log=None, env: dict | None = None) -> None:
        """args: the flags after `glm5c serve` (add `--port 0` to take any free port)."""
        self.lines: list[str] = []
        self._log = log
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glm5c.cli", "serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        self.address, self.pids = self.wait_ready(start_timeout_s, after=0)

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
            if self._log is not None:
                self._log(line.rstrip("\n"))
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout_s: float, after: int | None = None) -> tuple[str, dict[str, int]]:
        """Wait for a ready line (the first, or the first after line index `after`: default now).
        -> (address, {process name: pid})."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            start = len(self.lines) if after is None else after
            while True:
                for line in self.lines[start:]:
                    match = _READY.search(line)
                    if match:
                        pids = {name: int(pid) for name, pid in (kv.split() for kv in match.group(2).split(", "))}
                        self.address, self.pids = match.group(1), pids
                        return match.group(1), pids
                start = len(self.lines)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"glm5c serve exited with {self.proc.returncode}:\n" + "\n".join(self.lines[-30:]))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"glm5c serve not ready after {timeout_s} s:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(0.2)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain) and wait; -> the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
