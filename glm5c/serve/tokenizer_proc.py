"""The tokenizer process: owns the clients' socket (a ZMQ ROUTER), checks every request, renders
chat messages with GLM-5's template, tokenizes, and forwards to the worker. It answers bad
requests itself, forwards the detokenizer's replies to the right client, and keeps the ledger of
requests in flight, which is what lets the server end each of them with exactly one terminal
message whatever dies:

- the worker or detokenizer dies -> the supervisor sends `reset`: every request in flight gets an
  "unavailable" error, and new ones are refused until the restarted pipeline is `ready`;
- a client disconnects (the socket monitor reports its connection's fd closed; each message's
  SRCFD says which client an fd belongs to) or cannot be reached (ROUTER_MANDATORY) -> its
  requests are aborted in the worker, so their KV blocks are freed; their "cancelled" finals
  then find nobody and are dropped;
- SIGTERM at the supervisor -> `drain`: new requests are refused, and `drained` is reported once
  the ledger is empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import protocol as p
from ..chat import ChatError, chat_token_ids
from ..sampling import SamplingParams
from ..tokenizer import load_tokenizer
from . import child
from .messages import (
    Abort, Control, Endpoints, Event, Limits, Probe, RequestSpec, Submit, control_decoder, encoder, request_key,
)  # fmt: skip

MAX_FRAME_BYTES = 4 * p.MAX_MESSAGE_BYTES  # larger frames make ZMQ drop the connection; smaller get an error


@dataclass(frozen=True)
class TokenizerSpec:
    model_dir: str
    host: str
    port: int  # 0: any free port (reported to the supervisor)
    curve_keys: str | None
    endpoints: Endpoints
    epoch: int


def main(spec: TokenizerSpec) -> None:
    supervisor = child.start_child()
    try:
        tokenizer = load_tokenizer(spec.model_dir)
    except ValueError as e:
        child.fail_to_start("tokenizer", e)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished client raises instead of vanishing
    router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    router.setsockopt(zmq.SNDHWM, 0)
    router.setsockopt(zmq.RCVHWM, 0)
    if spec.curve_keys is not None:
        _serve_with_curve(context, router, Path(spec.curve_keys))
    address = f"tcp://{spec.host}:{spec.port}"
    try:
        if spec.port == 0:
            address = f"tcp://{spec.host}:{router.bind_to_random_port(f'tcp://{spec.host}')}"
        else:
            router.bind(address)
    except zmq.ZMQError as e:  # address in use, no such interface
        child.fail_to_start("tokenizer", f"cannot listen on {address}: {e}")
    ends = spec.endpoints
    front = Front(
        tokenizer, router,
        replies=child.socket(context, zmq.PULL, ends.replies, bind=True),
        control=child.socket(context, zmq.PULL, ends.control, bind=True),
        to_worker=child.socket(context, zmq.PUSH, ends.worker, bind=False),
        events=child.socket(context, zmq.PUSH, ends.events, bind=False),
        epoch=spec.epoch,
    )  # fmt: skip
    front.events.send(encoder.encode(Event("ready", "tokenizer", spec.epoch, detail=address)))
    front.run(lambda: child.orphaned(supervisor))


def _serve_with_curve(context: zmq.Context, router: zmq.Socket, keys: Path) -> None:
    """CURVE encryption + authentication: the server's secret key, and only clients whose public
    keys (`*.key`) lie in the same directory may connect."""
    from zmq.auth import load_certificate
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_certificate(keys / "server.key_secret")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys))
    router.curve_secretkey, router.curve_publickey, router.curve_server = secret, public, True


class Front:
    def __init__(self, tokenizer, router, replies, control, to_worker, events, epoch: int) -> None:
        self.tokenizer, self.router, self.replies, self.control = tokenizer, router, replies, control
        self.to_worker, self.events, self.epoch = to_worker, events, epoch
        self.state = "loading"  # -> ready <-> restarting; -> draining
        self.limits: Limits | None = None
        self.inflight: dict[str, tuple[bytes, str]] = {}  # key -> (client identity, request id)
        self.by_client: dict[bytes, set[str]] = {}
        self.identity_of_fd: dict[int, bytes] = {}  # a client connection's fd -> its identity
        self.aborted: set[bytes] = set()  # clients gone whose requests were aborted
        self.monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.probes: list[tuple[bytes, str]] = []  # health/stats asked of the pipeline, in order
        self._drained_sent = False

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, should_exit) -> None:
        poller = self.poller()
        last_check = time.monotonic()
        while True:
            self.poll_once(poller, 1000)
            if time.monotonic() - last_check > 1.0:
                if should_exit():
                    return
                last_check = time.monotonic()

    def poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self.replies, self.control, self.router, self.monitor):
            poller.register(sock, zmq.POLLIN)
        return poller

    def poll_once(self, poller: zmq.Poller, timeout_ms: int) -> None:
        ready = dict(poller.poll(timeout_ms))
        if self.replies in ready:  # finishing work first
            for _ in range(1024):
                try:
                    self.on_reply(self.replies.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        if self.control in ready:
            self.on_control(control_decoder.decode(self.control.recv()))
        # disconnects before clients' messages: a client that connects as another leaves may be
        # given the same fd, and the leaver's event, queued first, must not take the newcomer's
        # identity (which its first message maps to that fd) for the leaver's
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            identity = self.identity_of_fd.pop(event["value"], None)
            if identity is not None:
                self.client_gone(identity)
        if self.router in ready:
            for _ in range(256):
                try:
                    self.on_client(self.router.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break

    # ---- from clients -------------------------------------------------------------------------
    def on_client(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        self.identity_of_fd[frames[-1].get(zmq.SRCFD)] = identity
        frames = [f.bytes for f in frames]
        if len(frames) != 2:
            return self.error(identity, None, "bad_request", f"expected one message frame, got {len(frames) - 1}")
        try:
            message = p.decode_client(frames[1])
        except p.ProtocolError as e:
            return self.error(identity, _request_id_of(frames[1]), "bad_request", f"invalid message: {e}")
        if isinstance(message, p.GenerateRequest):
            self.generate(identity, message)
        elif isinstance(message, p.Cancel):
            key = request_key(identity, message.request_id)
            if key in self.inflight:  # its "cancelled" final comes back through the pipeline
                self.to_worker.send(encoder.encode(Abort(self.epoch, key)))
        elif self.state != "ready":
            if isinstance(message, p.HealthCheck):
                self.send(identity, p.Health(False, detail=self.state))
            else:
                self.error(identity, None, "unavailable", f"the server is {self.state}")
        else:
            kind = "health" if isinstance(message, p.HealthCheck) else "stats"
            self.probes.append((identity, kind))
            self.to_worker.send(encoder.encode(Probe(self.epoch, identity, kind)))

    def generate(self, identity: bytes, request: p.GenerateRequest) -> None:
        rid = request.request_id
        if self.state != "ready":
            why = "shutting down" if self.state == "draining" else self.state
            return self.error(identity, rid, "unavailable", f"the server is {why}; retry later")
        key = request_key(identity, rid)
        if key in self.inflight:
            return self.error(identity, rid, "bad_request", f"request_id {rid!r} is already in flight on this connection")
        try:
            ids, chat = self.prompt_ids(request)
            sampling = _sampling(request.sampling)
        except ValueError as e:
            return self.error(identity, rid, "bad_request", str(e))
        if sampling["stop"] and self.tokenizer is None:
            return self.error(identity, rid, "bad_request", "stop strings need a tokenizer, and this model has none")
        context = self.limits.max_model_len
        if len(ids) + request.sampling.max_tokens > context:
            return self.error(identity, rid, "too_long", f"the prompt's {len(ids)} tokens + max_tokens "
                              f"{request.sampling.max_tokens} exceed the context of {context} tokens")  # fmt: skip
        spec = RequestSpec(identity, rid, request.stream, time.monotonic(), len(ids), list(sampling["stop"]), chat,
                           request.enable_thinking, request.tools, request.sampling.logprobs is not None)  # fmt: skip
        self.inflight[key] = (identity, rid)
        self.by_client.setdefault(identity, set()).add(key)
        self.to_worker.send(encoder.encode(Submit(self.epoch, key, ids, sampling, spec)))

    def prompt_ids(self, request: p.GenerateRequest) -> tuple[list[int], bool]:
        """-> token ids, and whether they were rendered from chat messages. ValueError names the problem."""
        if request.prompt_token_ids is not None:
            ids = request.prompt_token_ids
            bad = [t for t in ids if t >= self.limits.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside the vocabulary [0, {self.limits.vocab_size}): {bad[:5]}")
            chat = False
        elif self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send prompt_token_ids")
        elif request.messages is not None:
            messages = [{k: v for k, v in msgspec.structs.asdict(m).items() if v is not None} for m in request.messages]
            try:
                ids = chat_token_ids(self.tokenizer, messages, request.tools, request.enable_thinking)
            except ChatError as e:
                raise ValueError(str(e)) from None
            chat = True
        else:
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=False)
            chat = False
        if not ids:
            raise ValueError("the prompt is empty")
        return list(ids), chat

    def client_gone(self, identity: bytes) -> None:
        """Nobody to answer: abort the client's requests so their KV blocks are freed (their
        "cancelled" finals still pass through here and close the ledger entries)."""
        if identity in self.aborted:
            return
        self.aborted.add(identity)
        for key in self.by_client.get(identity, ()):
            self.to_worker.send(encoder.encode(Abort(self.epoch, key)))
        self.probes = [(i, k) for i, k in self.probes if i != identity]

    # ---- from the detokenizer -----------------------------------------------------------------
    def on_reply(self, frames: list[bytes]) -> None:
        epoch, identity, rid, terminal, payload = frames
        if int(epoch) != self.epoch:
            return  # from a pipeline that has been replaced; its requests were already failed
        if rid:
            key = request_key(identity, rid.decode())
            if key not in self.inflight:
                return  # failed, or its client left
            if terminal == b"1":
                self._forget(key)
        elif self.probes:
            self.probes.pop(0)
        self.send_raw(identity, payload)
        self._maybe_drained()

    # ---- from the supervisor ------------------------------------------------------------------
    def on_control(self, message: Control) -> None:
        if message.kind == "ready":
            self.epoch, self.limits = message.epoch, message.limits
            if self.state != "draining":
                self.state = "ready"
            self.events.send(encoder.encode(Event("serving", "tokenizer", self.epoch)))
        elif message.kind == "reset":
            self.fail_all(message.reason, abort=False)
            self.epoch = message.epoch
            if self.state != "draining":
                self.state = "restarting"
        elif message.kind == "drain":
            self.state = "draining"
        elif message.kind == "fail_all":
            self.fail_all(message.reason, abort=True)
        self._maybe_drained()

    def fail_all(self, reason: str, abort: bool) -> None:
        for key, (identity, rid) in list(self.inflight.items()):
            if abort:
                self.to_worker.send(encoder.encode(Abort(self.epoch, key)))
            self.error(identity, rid, "unavailable", reason)
        self.inflight.clear()
        self.by_client.clear()
        self.aborted.clear()
        for identity, kind in self.probes:
            if kind == "health":
                self.send(identity, p.Health(False, detail=reason))
            else:
                self.error(identity, None, "unavailable", reason)
        self.probes.clear()

    # ---- replies ------------------------------------------------------------------------------
    def error(self, identity: bytes, request_id: str | None, code: str, message: str) -> None:
        self.send(identity, p.Error(request_id, code, message))

    def send(self, identity: bytes, message: msgspec.Struct) -> None:
        self.send_raw(identity, p.encode(message))

    def send_raw(self, identity: bytes, payload: bytes) -> None:
        try:
            self.router.send_multipart([identity, payload], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client has gone
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.client_gone(identity)

    def _forget(self, key: str) -> None:
        identity, _ = self.inflight.pop(key)
        keys = self.by_client.get(identity)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_client[identity]
                self.aborted.discard(identity)

    def _maybe_drained(self) -> None:
        if self.state == "draining" and not self.inflight and not self._drained_sent:
            self._drained_sent = True
            self.events.send(encoder.encode(Event("drained", "tokenizer", self.epoch)))


def _sampling(wire: p.WireSampling) -> dict:
    """Wire sampling -> SamplingParams keyword arguments, checked by SamplingParams itself."""
    fields = msgspec.structs.asdict(wire)
    fields["stop"], fields["stop_token_ids"] = tuple(fields["stop"]), tuple(fields["stop_token_ids"])
    SamplingParams(**fields)  # raises ValueError naming the bad field
    fields["stop"], fields["stop_token_ids"] = list(fields["stop"]), list(fields["stop_token_ids"])
    return fields


def _request_id_of(payload: bytes) -> str | None:
    """The request id of a message that failed to decode, when it can still be read, so that
    the client can tell which of its requests the error is about."""
    try:
        data = msgspec.msgpack.decode(payload)
    except Exception:  # anything undecodable: no id
        return None
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None
