"""Clients for `glm5c serve`: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("tcp://127.0.0.1:5555") as client:
        for delta in (stream := client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=64)):
            print(delta.reasoning or delta.text, end="")
        print(stream.final.finish_reason, stream.final.usage)

Each request streams `protocol.Delta`s and ends with `stream.final` (a `protocol.Final`); an
error reply raises `RequestError` (with its `code`). Closing a stream before its end (leaving the
loop, `close()`, garbage collection) cancels the request on the server. `timeout_s` bounds the
wait for each message; when it passes, the request is cancelled and `TimeoutError` raised. If the
connection to the server drops, every request in flight raises `RequestError("unavailable")`;
later requests go to the server once it is back.

A server bound beyond loopback uses CURVE: pass `curve_keys`, the directory `glm5c keys` wrote
(the server's public key `server.key` and this client's `client.key_secret`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import protocol as p


class RequestError(Exception):
    """The server answered a request with an error (or could not be reached)."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


def build_request(
    request_id: str,
    prompt: str | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
    prompt_token_ids: list[int] | None = None,
    tools: list[dict[str, Any]] | None = None,
    enable_thinking: bool = True,
    stream: bool = True,
    **sampling: Any,
) -> p.GenerateRequest:
    """Keyword sampling parameters are `protocol.WireSampling`'s (max_tokens, temperature, ...).
    Raises ValueError for a request the server would refuse on its face."""
    try:
        wire = msgspec.convert(sampling, p.WireSampling)
        chat = None if messages is None else msgspec.convert(messages, list[p.ChatMessage])
        request = p.GenerateRequest(request_id, prompt=prompt, messages=chat, prompt_token_ids=prompt_token_ids,
                                    tools=tools, enable_thinking=enable_thinking, sampling=wire, stream=stream)  # fmt: skip
        return p.decode_client(p.encode(request))  # the server's own checks, here
    except (msgspec.ValidationError, p.ProtocolError) as e:
        raise ValueError(str(e)) from None


def _socket(context: zmq.Context, address: str, curve_keys: str | Path | None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if curve_keys is not None:
        from zmq.auth import load_certificate

        keys = Path(curve_keys)
        server_public, _ = load_certificate(keys / "server.key")
        public, secret = load_certificate(keys / "client.key_secret")
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public
    sock.connect(address)
    return sock


_LOST = p.Error(None, "unavailable", "lost the connection to the server")


class _Inbox:
    """Replies sorted by request: one queue per request id, one for health/stats replies."""

    def __init__(self) -> None:
        self.requests: dict[str, deque] = {}
        self.probes: deque = deque()
        self.pending_probes = 0  # health/stats asked and not yet answered

    def put(self, message: p.ServerMessage) -> None:
        rid = getattr(message, "request_id", None)
        if rid is not None:
            queue = self.requests.get(rid)
            if queue is not None:  # else: a request this client forgot (cancelled, closed)
                queue.append(message)
        else:  # Health, Stats, or an error that names no request
            self.probes.append(message)

    def lost(self) -> None:
        """The connection dropped: everything in flight ends with an error."""
        for rid, queue in self.requests.items():
            queue.append(p.Error(rid, _LOST.code, _LOST.message))
        self.probes.extend([_LOST] * (self.pending_probes - len(self.probes)))


class Client:
    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout_s: float | None = 60.0,
                 curve_keys: str | Path | None = None) -> None:  # fmt: skip
        self.address, self.timeout_s = address, timeout_s
        self._context = zmq.Context()
        self._sock = _socket(self._context, address, curve_keys)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._inbox = _Inbox()
        self._ids = itertools.count()
        self._prefix = f"c{os.getpid()}-{id(self):x}-"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._context.closed:
            self._sock.disable_monitor()
            self._context.destroy(linger=0)

    # ---- requests ---------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, request_id: str | None = None, **kwargs: Any) -> Stream:
        """Start a request; -> a Stream of Deltas. kwargs: see build_request."""
        request = build_request(request_id or self._prefix + str(next(self._ids)), prompt, **kwargs)
        if request.request_id in self._inbox.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in flight")
        self._inbox.requests[request.request_id] = deque()
        self._sock.send(p.encode(request))
        return Stream(self, request.request_id)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> p.Final:
        """One request, not streamed: -> its Final (with text, reasoning and tool_calls)."""
        stream = self.generate(prompt, stream=False, **kwargs)
        for _ in stream:
            pass
        return stream.final

    def cancel(self, request_id: str) -> None:
        self._sock.send(p.encode(p.Cancel(request_id)))

    def health(self) -> p.Health:
        return self._probe(p.HealthCheck())

    def stats(self) -> p.Stats:
        return self._probe(p.StatsRequest())

    def _probe(self, message) -> Any:
        self._sock.send(p.encode(message))
        self._inbox.pending_probes += 1
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        try:
            while not self._inbox.probes:
                self._pump(deadline, "a health/stats reply")
        finally:
            self._inbox.pending_probes -= 1
        reply = self._inbox.probes.popleft()
        if isinstance(reply, p.Error):
            raise RequestError(reply.code, reply.message)
        return reply

    def _pump(self, deadline: float | None, waiting_for: str) -> None:
        """Receive what has arrived (waiting until `deadline`) into the inbox."""
        timeout_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        events = dict(self._poller.poll(timeout_ms))
        if not events:
            raise TimeoutError(f"no reply from {self.address} for {waiting_for} within {self.timeout_s} s")
        if self._monitor in events:
            event = parse_monitor_message(self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._inbox.lost()
        while self._sock.poll(0):
            try:
                self._inbox.put(p.decode_server(self._sock.recv()))
            except p.ProtocolError:
                continue  # not a message from a glm5c server; nothing to route it to


def _delta_or_end(stream, message: p.ServerMessage, stop: type[Exception]) -> p.Delta:
    """A Delta is returned; a Final ends the stream (kept in stream.final); an Error raises."""
    if isinstance(message, p.Delta):
        return message
    stream._end()
    if isinstance(message, p.Error):
        raise RequestError(message.code, message.message, stream.request_id)
    stream.final = message
    raise stop


class Stream:
    """The replies to one request: iterate for Deltas; then `final` holds the Final."""

    def __init__(self, client: Client, request_id: str) -> None:
        self.client, self.request_id = client, request_id
        self.final: p.Final | None = None
        self._done = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> p.Delta:
        if self._done:
            raise StopIteration
        client = self.client
        queue = client._inbox.requests[self.request_id]
        deadline = None if client.timeout_s is None else time.monotonic() + client.timeout_s
        while not queue:
            try:
                client._pump(deadline, f"request {self.request_id!r}")
            except TimeoutError:
                self.close()
                raise
        return _delta_or_end(self, queue.popleft(), StopIteration)

    def _end(self) -> None:
        self._done = True
        self.client._inbox.requests.pop(self.request_id, None)

    def close(self) -> None:
        """Cancel the request if it is still running; its remaining replies are dropped."""
        if not self._done:
            self._end()
            if not self.client._context.closed:
                self.client.cancel(self.request_id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to tell
            pass


class AsyncClient:
    """The asyncio client: `async for delta in await client.generate(...)`; same semantics as Client."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout_s: float | None = 60.0,
                 curve_keys: str | Path | None = None) -> None:  # fmt: skip
        self.address, self.timeout_s = address, timeout_s
        self._context = zmq.asyncio.Context()
        self._sock = _socket(self._context, address, curve_keys)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._queues: dict[str, asyncio.Queue] = {}
        self._probes: asyncio.Queue | None = None
        self._pending_probes = 0
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count()
        self._prefix = f"a{os.getpid()}-{id(self):x}-"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        if not self._context.closed:
            self._sock.disable_monitor()
            self._context.destroy(linger=0)

    async def generate(self, prompt: str | None = None, *, request_id: str | None = None, **kwargs: Any) -> AsyncStream:
        request = build_request(request_id or self._prefix + str(next(self._ids)), prompt, **kwargs)
        if request.request_id in self._queues:
            raise ValueError(f"request_id {request.request_id!r} is already in flight")
        self._start_reader()
        self._queues[request.request_id] = asyncio.Queue()
        await self._sock.send(p.encode(request))
        return AsyncStream(self, request.request_id)

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> p.Final:
        stream = await self.generate(prompt, stream=False, **kwargs)
        async for _ in stream:
            pass
        return stream.final

    async def cancel(self, request_id: str) -> None:
        await self._sock.send(p.encode(p.Cancel(request_id)))

    async def health(self) -> p.Health:
        return await self._probe(p.HealthCheck())

    async def stats(self) -> p.Stats:
        return await self._probe(p.StatsRequest())

    async def _probe(self, message) -> Any:
        self._start_reader()
        await self._sock.send(p.encode(message))
        self._pending_probes += 1
        try:
            reply = await asyncio.wait_for(self._probes.get(), self.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no reply from {self.address} within {self.timeout_s} s") from None
        finally:
            self._pending_probes -= 1
        if isinstance(reply, p.Error):
            raise RequestError(reply.code, reply.message)
        return reply

    def _start_reader(self) -> None:
        if self._reader is None:
            self._probes = asyncio.Queue()
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            events = dict(await poller.poll())
            if self._monitor in events:
                event = parse_monitor_message(await self._monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    for rid, queue in self._queues.items():
                        queue.put_nowait(p.Error(rid, _LOST.code, _LOST.message))
                    for _ in range(self._pending_probes - self._probes.qsize()):
                        self._probes.put_nowait(_LOST)
            if self._sock in events:
                while await self._sock.poll(0):
                    try:
                        message = p.decode_server(await self._sock.recv())
                    except p.ProtocolError:
                        continue
                    rid = getattr(message, "request_id", None)
                    if rid is None:
                        self._probes.put_nowait(message)
                    elif rid in self._queues:
                        self._queues[rid].put_nowait(message)


class AsyncStream:
    def __init__(self, client: AsyncClient, request_id: str) -> None:
        self.client, self.request_id = client, request_id
        self.final: p.Final | None = None
        self._done = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> p.Delta:
        if self._done:
            raise StopAsyncIteration
        queue = self.client._queues[self.request_id]
        try:
            message = await asyncio.wait_for(queue.get(), self.client.timeout_s)
        except asyncio.TimeoutError:
            await self.aclose()
            raise TimeoutError(f"no reply to request {self.request_id!r} within {self.client.timeout_s} s") from None
        return _delta_or_end(self, message, StopAsyncIteration)

    def _end(self) -> None:
        self._done = True
        self.client._queues.pop(self.request_id, None)

    async def aclose(self) -> None:
        if not self._done:
            self._end()
            if not self.client._context.closed:
                await self.client.cancel(self.request_id)
