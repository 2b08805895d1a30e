"""`glm5c serve`: start the tokenizer, worker and detokenizer processes, and keep them honest.

Start: the three children start (spawned, never forked: the worker holds torch state); the
server is ready, and says where it listens, only when the worker has loaded the model (or the
compiled artifacts) and every child has reported in.

A child dies: every request in flight ends with an "unavailable" error, within a second —
the tokenizer holds the ledger of requests in flight and is told to fail them (if the tokenizer
itself died, its clients lose the connection, and the client library ends their requests).
Then the pipeline restarts (worker and detokenizer with a new epoch, plus the tokenizer if it
died), up to `max_restarts` times; one death too many, or a child that cannot start, and the
server exits with status 1.

SIGTERM or SIGINT: drain. New requests are refused, requests in flight run to completion for up
to `drain_timeout_s` (then they end with an error), the children stop, and the exit status is 0.
"""

from __future__ import annotations

import ipaddress
import multiprocessing as mp
from multiprocessing.connection import wait as wait_for_exit
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..engine import EngineConfig
from . import child
from .detokenizer_proc import DetokenizerSpec
from .detokenizer_proc import main as detokenizer_main
from .messages import Control, Endpoints, Event, Limits, encoder, event_decoder
from .tokenizer_proc import TokenizerSpec
from .tokenizer_proc import main as tokenizer_main
from .worker_proc import WorkerSpec
from .worker_proc import main as worker_main


class ServeError(RuntimeError):
    """The server could not start (the text says why)."""


@dataclass(frozen=True)
class ServeConfig:
    model_dir: str
    artifacts: str | None = None
    host: str = "127.0.0.1"
    port: int = 5555
    curve_keys: str | None = None  # directory from `glm5c keys`; required for a non-loopback host
    dtype: str | None = None
    device: str = "cpu"
    engine: EngineConfig = field(default_factory=EngineConfig)
    drain_timeout_s: float = 30.0
    max_restarts: int = 3
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not Path(self.model_dir, "config.json").is_file():
            raise ValueError(f"{self.model_dir} is not a model directory (no config.json)")
        if self.artifacts is not None and not Path(self.artifacts, "manifest.json").is_file():
            raise ValueError(f"--artifacts {self.artifacts}: no manifest.json there (run `glm5c compile` first)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is not in [0, 65535]")
        if self.drain_timeout_s < 0 or self.max_restarts < 0 or self.start_timeout_s <= 0:
            raise ValueError("drain_timeout_s and max_restarts must be >= 0, start_timeout_s > 0")
        if not _is_loopback(self.host) and self.curve_keys is None:
            raise ValueError(
                f"binding to {self.host} exposes the server beyond this machine: pass --curve-keys DIR "
                "(make one with `glm5c keys --out DIR`), or bind to 127.0.0.1"
            )
        if self.curve_keys is not None:
            missing = [f for f in ("server.key", "server.key_secret") if not (Path(self.curve_keys) / f).is_file()]
            if missing:
                raise ValueError(f"--curve-keys {self.curve_keys} lacks {', '.join(missing)} (see `glm5c keys`)")
            if not zmq.has("curve"):
                raise ValueError("this pyzmq's libzmq was built without CURVE support")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


class Supervisor:
    def __init__(self, config: ServeConfig, log=None) -> None:
        self.config = config
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.mp = mp.get_context("spawn")
        self.run_dir = tempfile.mkdtemp(prefix="glm5c-serve-")
        self.endpoints = Endpoints(self.run_dir)
        self.context = zmq.Context()
        self.events = child.socket(self.context, zmq.PULL, self.endpoints.events, bind=True)
        self.control = child.socket(self.context, zmq.PUSH, self.endpoints.control, bind=False)
        self.epoch = 0
        self.port = config.port
        self.address: str | None = None
        self.limits: Limits | None = None
        self.children: dict[str, mp.Process] = {}
        self.restarts = 0
        self._signal: int | None = None

    # ---- entry ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (-> 0) or an unrecoverable failure (-> 1)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            try:
                self.start_pipeline(with_tokenizer=True)
            except ServeError as e:
                self.log(f"glm5c serve: error: {e}")
                return 1
            self.log(f"glm5c serve: ready on {self.address} (pids: {self._pids()}; "
                     f"max_model_len {self.limits.max_model_len})")  # fmt: skip
            return self.supervise()
        finally:
            self.stop_children()
            self.context.destroy(linger=0)
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    # ---- children -------------------------------------------------------------------------------
    def start_pipeline(self, with_tokenizer: bool) -> None:
        cfg = self.config
        expected = {"worker", "detokenizer"} | ({"tokenizer"} if with_tokenizer else set())
        if with_tokenizer:
            self._spawn("tokenizer", tokenizer_main,
                        TokenizerSpec(cfg.model_dir, cfg.host, self.port, cfg.curve_keys, self.endpoints, self.epoch))  # fmt: skip
        self._spawn("worker", worker_main, WorkerSpec(cfg.model_dir, cfg.artifacts, cfg.dtype, cfg.device, cfg.engine,
                                                      self.endpoints, self.epoch))  # fmt: skip
        self._spawn("detokenizer", detokenizer_main, DetokenizerSpec(cfg.model_dir, self.endpoints, self.epoch))
        deadline = time.monotonic() + cfg.start_timeout_s
        while expected:
            if self._signal is not None:
                raise ServeError(f"interrupted by signal {self._signal} while starting")
            for name in expected:
                if not self.children[name].is_alive():
                    code = self.children[name].exitcode
                    raise ServeError(f"the {name} process exited with status {code} while starting (see its error above)")
            if time.monotonic() > deadline:
                raise ServeError(f"{', '.join(sorted(expected))} not ready after {cfg.start_timeout_s:.0f} s")
            if self.events.poll(200):
                event = event_decoder.decode(self.events.recv())
                if event.kind == "ready" and event.epoch == self.epoch:
                    expected.discard(event.who)
                    if event.who == "tokenizer":
                        self.address = event.detail
                        self.port = int(event.detail.rsplit(":", 1)[1])  # a restarted tokenizer binds the same port
                    if event.limits is not None:
                        self.limits = event.limits
        self.control.send(encoder.encode(Control("ready", self.epoch, limits=self.limits)))
        while True:  # ready means the tokenizer has taken it (its control socket may be reconnecting)
            if time.monotonic() > deadline or not self.children["tokenizer"].is_alive():
                raise ServeError("the tokenizer did not take the ready signal")
            if self.events.poll(200):
                event = event_decoder.decode(self.events.recv())
                if event.kind == "serving" and event.epoch == self.epoch:
                    return

    def _spawn(self, name: str, target, spec) -> None:
        process = self.mp.Process(target=target, args=(spec,), name=f"glm5c-{name}", daemon=False)
        process.start()
        self.children[name] = process

    def _pids(self) -> str:
        return ", ".join(f"{name} {p.pid}" for name, p in self.children.items())

    def stop_children(self, names: list[str] | None = None, grace_s: float = 5.0) -> None:
        procs = [self.children[n] for n in (names or list(self.children)) if n in self.children]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()

    # ---- supervision ----------------------------------------------------------------------------
    def supervise(self) -> int:
        while True:
            if self._signal is not None:
                return self.drain()
            dead = [name for name, proc in self.children.items() if not proc.is_alive()]
            if dead:
                if not self.recover(dead):
                    return 1
                continue
            wait_for_exit([p.sentinel for p in self.children.values()], timeout=0.2)

    def recover(self, dead: list[str]) -> bool:
        """A child died: fail what was in flight, restart the pipeline. -> False to exit."""
        codes = ", ".join(f"{n} (status {self.children[n].exitcode})" for n in dead)
        reason = f"the server's {' and '.join(dead)} process died; the request was not completed"
        self.restarts += 1
        self.epoch += 1
        restart_tokenizer = "tokenizer" in dead
        if not restart_tokenizer:  # the tokenizer ends every request in flight with an error
            self.control.send(encoder.encode(Control("reset", self.epoch, reason=reason)))
        if self.restarts > self.config.max_restarts:
            self.log(f"glm5c serve: {codes} died; {self.restarts - 1} restarts allowed already used: exiting")
            if not restart_tokenizer:
                time.sleep(0.5)  # let the tokenizer send those errors before it is stopped
            return False
        self.log(f"glm5c serve: {codes} died; restarting (restart {self.restarts} of {self.config.max_restarts})")
        self.stop_children(["tokenizer", "worker", "detokenizer"] if restart_tokenizer else ["worker", "detokenizer"])
        try:
            self.start_pipeline(with_tokenizer=restart_tokenizer)
        except ServeError as e:
            self.log(f"glm5c serve: restart failed: {e}")
            return False
        self.log(f"glm5c serve: ready again on {self.address} (pids: {self._pids()})")
        return True

    def drain(self) -> int:
        timeout = self.config.drain_timeout_s
        self.log(f"glm5c serve: signal {self._signal}: draining (up to {timeout:.0f} s), refusing new requests")
        self.control.send(encoder.encode(Control("drain", self.epoch)))
        deadline, told = time.monotonic() + timeout, False
        while True:
            if self.events.poll(100):
                event = event_decoder.decode(self.events.recv())
                if event.kind == "drained":
                    break
            if any(not p.is_alive() for p in self.children.values()):
                self.log("glm5c serve: a process died while draining; its requests were not completed")
                if self.children["tokenizer"].is_alive():
                    self.control.send(encoder.encode(Control("fail_all", self.epoch,
                                                             reason="the server stopped while draining")))  # fmt: skip
                    time.sleep(0.5)
                return 1
            if time.monotonic() > deadline and not told:
                told = True
                self.control.send(encoder.encode(Control("fail_all", self.epoch,
                                                         reason=f"not finished within the {timeout:.0f} s drain")))  # fmt: skip
        self.log("glm5c serve: drained; stopping")
        return 0


def serve(config: ServeConfig, log=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Supervisor(config, log).run()
