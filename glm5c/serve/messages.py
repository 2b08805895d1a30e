"""The server's internal wire: where each process listens, and what the processes tell each other.

    client --ROUTER--> tokenizer --Submit/Abort/Probe--> worker --Accepted/Outputs/...--> detokenizer
       ^                  |   ^                            ^                                  |
       +------------------+   +---- reply frames ----------|----------------------------------+
                                                           +------ Abort (a stop string hit) --+

Every socket is a ZMQ PUSH/PULL pair over ipc:// in the server's run directory; only the
tokenizer's client-facing ROUTER is tcp. Messages are msgpack-encoded msgspec Structs, except
the detokenizer's replies, which are multipart frames [epoch, client identity, request id,
terminal flag, encoded `protocol.ServerMessage`] so that the tokenizer forwards them without
decoding. `epoch` counts pipeline restarts: after a worker or detokenizer dies, the supervisor
starts fresh ones with the next epoch, and anything stamped with an older one is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import msgspec
from msgspec import Struct


@dataclass(frozen=True)
class Endpoints:
    """ipc:// addresses inside the server's run directory."""

    run_dir: str

    def _ipc(self, name: str) -> str:
        return f"ipc://{Path(self.run_dir) / name}"

    @property
    def worker(self) -> str:  # worker PULL: Submit, Abort, Probe
        return self._ipc("worker")

    @property
    def detokenizer(self) -> str:  # detokenizer PULL: what the worker produced
        return self._ipc("detokenizer")

    @property
    def replies(self) -> str:  # tokenizer PULL: reply frames for clients
        return self._ipc("replies")

    @property
    def control(self) -> str:  # tokenizer PULL: the supervisor's commands
        return self._ipc("control")

    @property
    def events(self) -> str:  # supervisor PULL: children's reports
        return self._ipc("events")


class Limits(Struct):
    """What the worker's engine accepts; the tokenizer checks requests against it."""

    max_model_len: int
    vocab_size: int


class RequestSpec(Struct):
    """What the detokenizer needs to turn a request's tokens into replies."""

    identity: bytes  # the client's ZMQ routing id
    request_id: str
    stream: bool
    arrival_s: float  # time.monotonic() when the tokenizer received it
    prompt_tokens: int
    stop: list[str] = []
    chat: bool = False  # rendered from messages: parse reasoning and tool calls
    thinking: bool = True
    tools: list[dict[str, Any]] | None = None
    logprobs: bool = False


# ---- tokenizer -> worker (and detokenizer -> worker: Abort) ---------------------------------------
class Submit(Struct, tag="submit"):
    epoch: int
    key: str  # identity.hex() + "/" + request_id: unique among requests in flight
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # SamplingParams fields, already validated
    spec: RequestSpec


class Abort(Struct, tag="abort"):
    epoch: int
    key: str


class Probe(Struct, tag="probe"):
    """Health or stats: answered by the worker through the detokenizer, so a reply proves the
    whole pipeline is alive."""

    epoch: int
    identity: bytes
    kind: Literal["health", "stats"]


WorkerMessage = Union[Submit, Abort, Probe]


# ---- worker -> detokenizer ------------------------------------------------------------------------
class Accepted(Struct, tag="accepted"):
    key: str
    spec: RequestSpec


class Rejected(Struct, tag="rejected"):
    spec: RequestSpec
    code: str
    message: str


class TokenOutput(Struct, array_like=True):
    key: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    first_scheduled_s: float = 0.0
    cached_tokens: int = 0


class Outputs(Struct, tag="outputs"):
    items: list[TokenOutput]
    sent_s: float  # time.monotonic() at the end of the step


class ProbeReply(Struct, tag="probe_reply"):
    identity: bytes
    kind: Literal["health", "stats"]
    stats: dict[str, float]


DetokenizerMessage = Union[Accepted, Rejected, Outputs, ProbeReply]


# ---- supervisor <-> children ---------------------------------------------------------------------
class Control(Struct, tag="control"):
    """supervisor -> tokenizer. ready: the pipeline of `epoch` is up (accept requests); reset:
    it died (fail every request in flight, refuse new ones until ready); drain: refuse new
    requests, report `drained` once none is in flight; fail_all: end what is left with an error."""

    kind: Literal["ready", "reset", "drain", "fail_all"]
    epoch: int
    reason: str = ""
    limits: Limits | None = None


class Event(Struct, tag="event"):
    """child -> supervisor: `ready` (loaded and listening; the tokenizer says where in detail,
    the worker gives its limits), `serving` (the tokenizer took the supervisor's `ready`: requests
    are accepted from now on) or `drained`."""

    kind: Literal["ready", "serving", "drained"]
    who: Literal["tokenizer", "worker", "detokenizer"]
    epoch: int
    detail: str = ""
    limits: Limits | None = None


encoder = msgspec.msgpack.Encoder()
worker_decoder = msgspec.msgpack.Decoder(WorkerMessage)
detokenizer_decoder = msgspec.msgpack.Decoder(DetokenizerMessage)
control_decoder = msgspec.msgpack.Decoder(Control)
event_decoder = msgspec.msgpack.Decoder(Event)


def request_key(identity: bytes, request_id: str) -> str:
    return f"{identity.hex()}/{request_id}"
