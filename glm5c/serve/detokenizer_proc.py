"""The detokenizer process: the worker's token ids -> the client's replies.

Per request: incremental text (whole characters only), stop strings (text that may start one is
held back; when one appears the text is cut, the request finishes with "stop" and the worker is
told to abort it), and for chat requests the GLM-5 reasoning and tool-call parsers, so deltas
carry `text`, `reasoning` and whole `tool_calls` and never split a marker. Every request ends
with exactly one Final or Error; replies go to the tokenizer process, which owns the clients'
socket.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import zmq

from .. import protocol as p
from ..detokenizer import IncrementalDetokenizer
from ..parsers import OutputParser
from ..tokenizer import load_tokenizer
from . import child
from .messages import (
    Abort, Accepted, Endpoints, Event, Outputs, ProbeReply, Rejected, RequestSpec, TokenOutput,
    detokenizer_decoder, encoder,
)  # fmt: skip


@dataclass(frozen=True)
class DetokenizerSpec:
    model_dir: str
    endpoints: Endpoints
    epoch: int


@dataclass
class _Request:
    spec: RequestSpec
    detok: IncrementalDetokenizer | None
    parser: OutputParser | None
    completion_tokens: int = 0
    first_token_s: float = 0.0
    last_token_s: float = 0.0
    first_scheduled_s: float = 0.0
    cached_tokens: int = 0
    text: list[str] = field(default_factory=list)  # when not streaming: the whole answer
    reasoning: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)


def main(spec: DetokenizerSpec) -> None:
    supervisor = child.start_child()
    try:
        tokenizer = load_tokenizer(spec.model_dir)
    except ValueError as e:
        child.fail_to_start("detokenizer", e)
    context = zmq.Context()
    inbox = child.socket(context, zmq.PULL, spec.endpoints.detokenizer, bind=True)
    replies = child.socket(context, zmq.PUSH, spec.endpoints.replies, bind=False)
    to_worker = child.socket(context, zmq.PUSH, spec.endpoints.worker, bind=False)
    events = child.socket(context, zmq.PUSH, spec.endpoints.events, bind=False)
    events.send(encoder.encode(Event("ready", "detokenizer", spec.epoch)))
    detokenizer = Detokenizer(tokenizer, spec.epoch, replies, to_worker)
    while not child.orphaned(supervisor):
        if inbox.poll(1000):
            detokenizer.handle(inbox.recv())


class Detokenizer:
    def __init__(self, tokenizer, epoch: int, replies: zmq.Socket, to_worker: zmq.Socket) -> None:
        self.tokenizer, self.epoch, self.replies, self.to_worker = tokenizer, epoch, replies, to_worker
        self.requests: dict[str, _Request] = {}
        self._epoch_frame = str(epoch).encode()

    def handle(self, data: bytes) -> None:
        message = detokenizer_decoder.decode(data)
        if isinstance(message, Outputs):
            now = time.monotonic()
            for item in message.items:
                self.tokens(item, now)
        elif isinstance(message, Accepted):
            self.accept(message.key, message.spec)
        elif isinstance(message, Rejected):
            self.reply(message.spec, p.Error(message.spec.request_id, message.code, message.message), terminal=True)
        elif isinstance(message, ProbeReply):
            if message.kind == "health":
                reply = p.Health(True, detail=f"{message.stats['running']:.0f} running, "
                                 f"{message.stats['waiting']:.0f} waiting")  # fmt: skip
            else:
                s = message.stats
                reply = p.Stats(int(s["running"]), int(s["waiting"]), int(s["kv_blocks_free"]),
                                int(s["kv_blocks_total"]), s["prefix_cache_hit_rate"], int(s["generated_tokens"]),
                                int(s["max_model_len"]), int(s["vocab_size"]), int(s["compilations"]),
                                s["draft_acceptance_rate"], s["draft_mean_accept_length"])  # fmt: skip
            self.replies.send_multipart([self._epoch_frame, message.identity, b"", b"0", p.encode(reply)])

    def accept(self, key: str, spec: RequestSpec) -> None:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, spec.stop)
        parser = OutputParser(thinking=spec.thinking, tools=spec.tools) if spec.chat and detok is not None else None
        self.requests[key] = _Request(spec, detok, parser)

    def tokens(self, item: TokenOutput, now: float) -> None:
        request = self.requests.get(item.key)
        if request is None:
            return  # already finished here (a stop string), the worker's "cancelled" comes after
        spec = request.spec
        if item.token_ids:
            if request.completion_tokens == 0:
                request.first_token_s, request.first_scheduled_s = now, item.first_scheduled_s
                request.cached_tokens = item.cached_tokens
            request.last_token_s = now
            request.completion_tokens += len(item.token_ids)
        finished, reason = item.finished, item.finish_reason
        text = ""
        if request.detok is not None:
            text = request.detok.push(item.token_ids)
            if request.detok.stopped_by is not None and not finished:
                finished, reason = True, "stop"
                self.to_worker.send(encoder.encode(Abort(self.epoch, item.key)))
            if finished:
                text += request.detok.finish()
        delta = p.Delta(spec.request_id, token_ids=item.token_ids)
        if request.parser is not None:
            parsed = request.parser.push(text, final=finished)
            delta.text, delta.reasoning = parsed.content, parsed.reasoning
            for call in parsed.tool_calls:
                arguments = json.dumps(call.arguments, ensure_ascii=False)
                delta.tool_calls.append(p.ToolCallDelta(len(request.calls), call.name, arguments))
                request.calls.append({"name": call.name, "arguments": call.arguments})
        else:
            delta.text = text
        if spec.logprobs and item.logprobs is not None:
            delta.logprobs = [p.TokenLogprob(t, lp, top) for t, (lp, top) in zip(item.token_ids, item.logprobs)]
        if spec.stream:
            if delta.text or delta.reasoning or delta.token_ids or delta.tool_calls:
                self.reply(spec, delta, terminal=False)
        else:
            request.text.append(delta.text)
            request.reasoning.append(delta.reasoning)
        if finished:
            del self.requests[item.key]
            self.reply(spec, self.final(request, reason or "stop"), terminal=True)

    def final(self, request: _Request, reason: str) -> p.Final:
        spec, n = request.spec, request.completion_tokens
        first = request.first_token_s or time.monotonic()
        timings = p.Timings(
            queue_s=max(0.0, (request.first_scheduled_s or first) - spec.arrival_s),
            ttft_s=first - spec.arrival_s,
            per_token_s=(request.last_token_s - first) / (n - 1) if n > 1 else 0.0,
        )
        usage = p.Usage(spec.prompt_tokens, n, request.cached_tokens)
        final = p.Final(spec.request_id, reason, usage, timings)
        if not spec.stream:
            final.text, final.reasoning, final.tool_calls = "".join(request.text), "".join(request.reasoning), request.calls
        return final

    def reply(self, spec: RequestSpec, message, terminal: bool) -> None:
        frames = [self._epoch_frame, spec.identity, spec.request_id.encode(), b"1" if terminal else b"0"]
        self.replies.send_multipart(frames + [p.encode(message)])
