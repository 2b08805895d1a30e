"""What every server child process shares: signals belong to the supervisor, and a child whose
supervisor is gone exits instead of lingering."""

from __future__ import annotations

import os
import signal
import sys

import zmq


def start_child() -> int:
    """Call first thing in a child. -> the supervisor's pid, for `orphaned`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the supervisor stops children with SIGTERM
    return os.getppid()


def orphaned(supervisor_pid: int) -> bool:
    return os.getppid() != supervisor_pid


def socket(context: zmq.Context, kind: int, address: str, bind: bool) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind in (zmq.PUSH, zmq.PULL):
        sock.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, 0)  # never drop or block on a burst
    (sock.bind if bind else sock.connect)(address)
    return sock


def fail_to_start(who: str, error: Exception | str) -> None:
    """A child that cannot start says why in one line (no traceback) and exits with status 2;
    the supervisor then reports which child failed and exits."""
    print(f"glm5c serve: the {who} cannot start: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
