"""The worker process: runs the engine (scheduler + model or compiled graphs) and nothing else.

Loop: take every Submit / Abort / Probe that has arrived (waiting for one only when idle), then
run one engine step and send its new tokens to the detokenizer in one message. A request the
engine refuses (too long, queue full) becomes a Rejected; an aborted one ends as "cancelled".
An exception in a step is not caught: the process dies, and the supervisor fails what it held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import zmq

from ..engine import Engine, EngineConfig, freeze_startup_heap
from ..sampling import SamplingParams
from ..scheduler import PromptTooLongError, QueueFullError
from . import child
from .messages import (
    Abort, Accepted, Endpoints, Event, Limits, Outputs, Probe, ProbeReply, Rejected, Submit, TokenOutput,
    encoder, worker_decoder,
)  # fmt: skip

IDLE_POLL_MS = 100


@dataclass(frozen=True)
class WorkerSpec:
    model_dir: str
    artifacts: str | None
    dtype: str | None
    device: str
    engine: EngineConfig
    endpoints: Endpoints
    epoch: int


def main(spec: WorkerSpec) -> None:
    supervisor = child.start_child()
    try:
        engine = Engine(spec.model_dir, spec.dtype, spec.device, spec.engine, spec.artifacts)
    except (ValueError, OSError, RuntimeError) as e:  # bad checkpoint, artifacts, device or dtype
        child.fail_to_start("worker", e)
    freeze_startup_heap()  # no ~0.2 s full garbage collections of the startup heap in a step
    context = zmq.Context()
    inbox = child.socket(context, zmq.PULL, spec.endpoints.worker, bind=True)
    to_detok = child.socket(context, zmq.PUSH, spec.endpoints.detokenizer, bind=False)
    events = child.socket(context, zmq.PUSH, spec.endpoints.events, bind=False)
    limits = Limits(engine.max_model_len, engine.model_config.vocab_size)
    events.send(encoder.encode(Event("ready", "worker", spec.epoch, limits=limits)))
    Worker(engine, inbox, to_detok, spec.epoch).run(lambda: child.orphaned(supervisor))


class Worker:
    def __init__(self, engine: Engine, inbox: zmq.Socket, to_detok: zmq.Socket, epoch: int) -> None:
        self.engine, self.inbox, self.to_detok, self.epoch = engine, inbox, to_detok, epoch

    def run(self, should_exit) -> None:
        last_check = time.monotonic()
        while True:
            busy = self.engine.has_unfinished()
            timeout_ms = 0 if busy else IDLE_POLL_MS
            while self.inbox.poll(timeout_ms):
                self.handle(self.inbox.recv())
                timeout_ms = 0
            if time.monotonic() - last_check > 1.0:
                if should_exit():
                    return
                last_check = time.monotonic()
            if busy or self.engine.has_unfinished():
                outputs = self.engine.step()
                if outputs:
                    items = [TokenOutput(o.request_id, o.new_token_ids, o.finished, o.finish_reason, o.logprobs,
                                         o.first_scheduled_s, o.cached_tokens) for o in outputs]  # fmt: skip
                    self.send(Outputs(items, time.monotonic()))

    def handle(self, data: bytes) -> None:
        message = worker_decoder.decode(data)  # only the tokenizer and detokenizer write here
        if message.epoch != self.epoch:
            return  # meant for a pipeline that has been replaced
        if isinstance(message, Submit):
            self.submit(message)
        elif isinstance(message, Abort):
            if self.engine.abort(message.key):
                self.send(Outputs([TokenOutput(message.key, [], True, "cancelled")], time.monotonic()))
        elif isinstance(message, Probe):
            self.send(ProbeReply(message.identity, message.kind, self.engine.stats()))

    def submit(self, message: Submit) -> None:
        try:
            params = SamplingParams(**message.sampling)
            self.engine.add_request(message.key, message.prompt_token_ids, params)
        except QueueFullError as e:
            self.send(Rejected(message.spec, "queue_full", str(e)))
        except (ValueError, TypeError) as e:
            code = "too_long" if isinstance(e, PromptTooLongError) else "bad_request"
            self.send(Rejected(message.spec, code, str(e).replace(repr(message.key), repr(message.spec.request_id))))
        else:
            self.send(Accepted(message.key, message.spec))

    def send(self, message: msgspec.Struct) -> None:
        self.to_detok.send(encoder.encode(message))
