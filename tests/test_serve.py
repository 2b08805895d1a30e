"""`glm5c serve` end to end, on the tiny checkpoint: real processes, real sockets.

One server serves the behaviour tests; the fault, drain and CURVE tests start their own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from glm5c import protocol as p
from glm5c.chat import render_chat
from glm5c.client import AsyncClient, Client, RequestError
from glm5c.serve.launcher import ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

START_S = 180.0


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServerProcess(["--model", str(tiny_dir), "--port", "0"], START_S) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from glm5c import LLM

    return LLM(tiny_dir)


def raw_socket(address: str, context: zmq.Context | None = None) -> zmq.Socket:
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def recv(sock: zmq.Socket, timeout_s: float = 30.0) -> p.ServerMessage:
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    return p.decode_server(sock.recv())


# ---- the happy path --------------------------------------------------------------------------------
@pytest.mark.parametrize("thinking", [True, False])
def test_chat_stream_equals_in_process_engine(server, llm, thinking):
    from glm5c import SamplingParams

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, GLM-5 — ünïcode ✓"}]
    expected = llm.generate(render_chat(llm.tokenizer, messages, None, thinking),
                            SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]  # fmt: skip
    with Client(server.address, timeout_s=30) as client:
        stream = client.generate(messages=messages, enable_thinking=thinking, max_tokens=24, temperature=0.0,
                                 ignore_eos=True)  # fmt: skip
        deltas = list(stream)
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == expected.token_ids
    text, reasoning = "".join(d.text for d in deltas), "".join(d.reasoning for d in deltas)
    # the random model never writes </think>: with thinking on, all of it is reasoning
    assert (reasoning if thinking else text) == expected.text
    assert (text if thinking else reasoning) == ""
    final = stream.final
    assert final.finish_reason == "length" and final.usage.completion_tokens == 24
    assert final.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert 0 <= final.timings.queue_s <= final.timings.ttft_s and final.timings.per_token_s > 0


def test_non_streaming_final_carries_the_text_and_logprobs(server, llm):
    from glm5c import SamplingParams

    expected = llm.generate("The quick brown fox", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    with Client(server.address, timeout_s=30) as client:
        final = client.complete("The quick brown fox", max_tokens=8, temperature=0.0, ignore_eos=True)
        assert final.text == expected.text and final.finish_reason == "length"
        deltas = list(client.generate("The quick brown fox", max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2))
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in lps] == expected.token_ids[:3]
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)


def test_stop_string_cuts_the_text_and_frees_the_blocks(server, llm):
    from glm5c import SamplingParams

    full = llm.generate("Once upon a time", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    with Client(server.address, timeout_s=30) as client:
        final = client.complete("Once upon a time", max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop])
        assert final.finish_reason == "stop" and final.text == full[: full.index(stop)]
        wait_idle(client)


def wait_idle(client: Client, timeout_s: float = 10.0) -> p.Stats:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        if (stats.running, stats.waiting, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total):
            return stats
        assert time.monotonic() < deadline, f"still busy: {stats}"
        time.sleep(0.05)


def test_serving_compiled_graphs_with_mtp(tiny_dir, tiny_artifacts, llm):
    """`glm5c serve --artifacts ... --speculative-tokens 2`: the worker runs the compiled main and
    MTP graphs, greedy text equals the eager in-process engine's, and the stats report no
    compilation and the drafts' acceptance."""
    from glm5c import SamplingParams

    args = ["--model", str(tiny_dir), "--port", "0", "--artifacts", str(tiny_artifacts), "--speculative-tokens", "2"]
    expected = llm.generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    with ServerProcess(args, START_S) as srv, Client(srv.address, timeout_s=60) as client:
        final = client.complete("Once upon a time", max_tokens=12, temperature=0.0, ignore_eos=True)
        assert final.text == expected.text
        stats = wait_idle(client)
        assert stats.compilations == 0 and stats.draft_mean_accept_length >= 1.0
        assert 0.0 <= stats.draft_acceptance_rate <= 1.0


def test_cancel_and_client_disconnect_free_kv_blocks(server):
    long = dict(max_tokens=3000, temperature=0.0, ignore_eos=True)
    with Client(server.address, timeout_s=30) as client:
        stream = client.generate("a long story", **long)
        next(stream)
        assert client.stats().running == 1
        stream.close()  # cancels
        wait_idle(client)
        # a client whose connection drops mid-stream: its request is aborted
        raw = raw_socket(server.address)
        raw.send(p.encode(p.GenerateRequest("gone", prompt="another long story", sampling=p.WireSampling(**long))))
        assert isinstance(recv(raw), p.Delta)
        raw.close(linger=0)
        wait_idle(client)
        # the same for a request that was not streaming (so nothing is sent to it before the end)
        raw = raw_socket(server.address)
        raw.send(p.encode(p.GenerateRequest("quiet", prompt="story", stream=False, sampling=p.WireSampling(**long))))
        time.sleep(0.3)
        assert client.stats().running == 1
        raw.close(linger=0)
        wait_idle(client)


def test_a_client_given_a_leavers_fd_is_not_taken_for_gone():
    """The tokenizer maps each client connection's fd to its identity to learn who left. A client
    connecting as another leaves gets the same fd; the leaver's disconnect event, queued first,
    must abort only the leaver's requests, even when the newcomer's first message is read in the
    same poll (once, the newcomer's stream was cancelled before its first token)."""
    from glm5c.serve.messages import Abort, Limits, Submit, request_key, worker_decoder
    from glm5c.serve.tokenizer_proc import Front

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    ends = {name: context.socket(kind) for name, kind in
            (("replies", zmq.PULL), ("control", zmq.PULL), ("to_worker", zmq.PUSH), ("events", zmq.PUSH))}  # fmt: skip
    worker = context.socket(zmq.PULL)
    worker.bind("inproc://worker")
    ends["to_worker"].connect("inproc://worker")
    front = Front(None, router, ends["replies"], ends["control"], ends["to_worker"], ends["events"], epoch=1)
    front.state, front.limits = "ready", Limits(max_model_len=4096, vocab_size=100)
    poller = front.poller()
    request = p.encode(p.GenerateRequest("r", prompt_token_ids=[1, 2, 3], sampling=p.WireSampling(max_tokens=8)))

    def client(identity: bytes) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(address)
        sock.send(request)
        return sock

    def to_worker() -> list:
        messages = []
        while worker.poll(200):
            messages.append(worker_decoder.decode(worker.recv()))
        return messages

    try:
        leaver = client(b"leaver")
        front.poll_once(poller, 2000)
        assert [type(m) for m in to_worker()] == [Submit]
        fd = next(fd for fd, identity in front.identity_of_fd.items() if identity == b"leaver")
        leaver.close(linger=0)
        time.sleep(0.2)  # the disconnect is seen and queued as an event, not yet read
        newcomer = client(b"newcomer")
        time.sleep(0.2)  # its request waits too: one poll reads both
        front.poll_once(poller, 2000)
        messages = to_worker()
        aborted = [m.key for m in messages if isinstance(m, Abort)]
        assert aborted == [request_key(b"leaver", "r")]
        assert [m.key for m in messages if isinstance(m, Submit)] == [request_key(b"newcomer", "r")]
        assert front.identity_of_fd.get(fd) == b"newcomer"  # (the fd was reused: the case at stake)
        newcomer.close(linger=0)
    finally:
        context.destroy(linger=0)


def test_explicit_cancel_ends_with_a_cancelled_final(server):
    sock = raw_socket(server.address)
    sock.send(p.encode(p.GenerateRequest("c1", prompt="x", sampling=p.WireSampling(max_tokens=3000, ignore_eos=True))))
    assert isinstance(recv(sock), p.Delta)
    sock.send(p.encode(p.Cancel("c1")))
    while isinstance(message := recv(sock), p.Delta):
        pass
    assert isinstance(message, p.Final) and message.finish_reason == "cancelled"
    sock.send(p.encode(p.Cancel("never-sent")))  # unknown ids are ignored: no reply
    assert not sock.poll(300)
    sock.close()


def test_async_client_streams_and_cancels_on_close(server):
    async def main():
        async with AsyncClient(server.address, timeout_s=30) as client:
            assert (await client.health()).ok
            stream = await client.generate("hi", max_tokens=4, temperature=0.0, ignore_eos=True)
            deltas = [d async for d in stream]
            assert len([t for d in deltas for t in d.token_ids]) == 4 and stream.final.usage.completion_tokens == 4
            stream = await client.generate("hi", max_tokens=3000, ignore_eos=True)
            await stream.__anext__()
            await stream.aclose()
            for _ in range(200):
                stats = await client.stats()
                if stats.running == 0:
                    break
                await asyncio.sleep(0.05)
            assert stats.running == 0 and stats.kv_blocks_free == stats.kv_blocks_total
            with pytest.raises(RequestError, match="too_long"):
                await client.complete(prompt_token_ids=[1] * 4000, max_tokens=200)

    asyncio.run(main())


SCRIPT = "Hm</think>Sure<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def scripted_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint rewired into a bigram model that, after `<think>`, writes SCRIPT and then
    <|user|> (an eos): every block's output projection is zero, so the last hidden state is the
    token's own embedding; embeddings are one-hot and lm_head maps each script token to the next."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from glm5c.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("ckpt") / "scripted"
    shutil.copytree(tiny_dir, out)
    tokenizer = load_tokenizer(out)
    ids = tokenizer.convert_tokens_to_ids(["<think>"]) + tokenizer.encode(SCRIPT, add_special_tokens=False)
    ids += tokenizer.convert_tokens_to_ids(["<|user|>"])
    assert len(set(ids[:-1])) == len(ids) - 1  # a bigram model needs each token once
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[name] = torch.zeros_like(t)
            elif name == "model.norm.weight":
                tensors[name] = torch.ones_like(t)
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                t = torch.zeros_like(t)
                for slot, (token, successor) in enumerate(zip(ids, ids[1:])):
                    if name == "lm_head.weight":
                        t[successor, slot] = 10.0
                    else:
                        t[token, slot] = 1.0
                tensors[name] = t
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


def test_reasoning_and_tool_calls_through_the_processes(scripted_dir):
    from glm5c import LLM, SamplingParams

    llm = LLM(scripted_dir)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = render_chat(llm.tokenizer, messages, WEATHER, True)
    expected = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert expected.text == SCRIPT and expected.finish_reason == "stop"  # the script, in-process
    with ServerProcess(["--model", str(scripted_dir), "--port", "0"], START_S) as server:
        with Client(server.address, timeout_s=30) as client:
            stream = client.generate(messages=messages, tools=WEATHER, max_tokens=40, temperature=0.0)
            deltas = list(stream)
            final = client.complete(messages=messages, tools=WEATHER, max_tokens=40, temperature=0.0)
    assert "".join(d.reasoning for d in deltas) == "Hm" and "".join(d.text for d in deltas) == "Sure"
    calls = [c for d in deltas for c in d.tool_calls]
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "get_weather", {"city": "Paris"})]
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert stream.final.finish_reason == "stop" and stream.final.usage.completion_tokens == len(expected.token_ids)
    assert (final.reasoning, final.text) == ("Hm", "Sure")
    assert final.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]


# ---- many clients ------------------------------------------------------------------------------
def test_32_clients_x_50_requests_each_get_exactly_their_replies(server):
    """Raw sockets, every request in flight at once; each request is identifiable by its prompt
    length and max_tokens, so a reply routed to the wrong request or client is caught."""
    n_clients, n_requests = 32, 50

    def shape(c: int, i: int) -> tuple[int, int]:
        return 1 + (c * n_requests + i) % 23, 1 + (c + i) % 5  # prompt length, max_tokens

    async def one_client(context, c: int) -> dict:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.address)
        for i in range(n_requests):
            length, max_tokens = shape(c, i)
            request = p.GenerateRequest(f"{c}-{i}", prompt_token_ids=[(c + i + k) % 1000 for k in range(length)],
                                        sampling=p.WireSampling(max_tokens=max_tokens, temperature=0.0,
                                                                ignore_eos=True), stream=i % 2 == 0)  # fmt: skip
            await sock.send(p.encode(request))
        tokens: dict[str, int] = {}
        finals: dict[str, list] = {}
        while len(finals) < n_requests:
            assert await sock.poll(60_000), f"client {c}: only {len(finals)} finals"
            message = p.decode_server(await sock.recv())
            assert isinstance(message, (p.Delta, p.Final)), message
            assert message.request_id.startswith(f"{c}-"), f"client {c} got {message.request_id}"
            if isinstance(message, p.Delta):
                assert message.request_id not in finals, "a delta after the final"
                tokens[message.request_id] = tokens.get(message.request_id, 0) + len(message.token_ids)
            else:
                assert message.request_id not in finals, "two finals"
                finals[message.request_id] = message
        assert not await sock.poll(500), "a message after every final"
        sock.close()
        for rid, final in finals.items():
            i = int(rid.split("-")[1])
            length, max_tokens = shape(c, i)
            assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (length, max_tokens), rid
            assert tokens.get(rid, max_tokens if i % 2 else 0) == max_tokens, rid
        return finals

    async def main():
        context = zmq.asyncio.Context()
        try:
            return await asyncio.gather(*(one_client(context, c) for c in range(n_clients)))
        finally:
            context.destroy(linger=0)

    results = asyncio.run(main())
    assert sum(len(r) for r in results) == n_clients * n_requests


# ---- bad input ---------------------------------------------------------------------------------
def _valid_request(rng) -> dict:
    return {"type": "generate", "request_id": f"f{rng.randrange(10**9)}", "prompt": "hello",
            "sampling": {"max_tokens": 4, "temperature": 0.5}}  # fmt: skip


_WRONG = [  # (where, value): each makes a valid request invalid
    (("request_id",), 17), (("request_id",), ""), (("request_id",), "x" * 200), (("prompt",), 5),
    (("prompt",), ["a"]), (("sampling",), "hot"), (("sampling", "max_tokens"), -5), (("sampling", "max_tokens"), 0),
    (("sampling", "max_tokens"), 10**12), (("sampling", "max_tokens"), 1.5), (("sampling", "max_tokens"), "4"),
    (("sampling", "temperature"), -1.0), (("sampling", "temperature"), float("nan")),
    (("sampling", "temperature"), float("inf")), (("sampling", "temperature"), 1e9), (("sampling", "top_p"), 0.0),
    (("sampling", "top_p"), 2.0), (("sampling", "top_k"), -7), (("sampling", "min_p"), 3.0),
    (("sampling", "logprobs"), 50), (("sampling", "stop"), ["x"] * 100), (("sampling", "stop"), [""]),
    (("sampling", "repetition_penalty"), 0.0), (("sampling", "presence_penalty"), 9.0), (("sampling", "seed"), "s"),
    (("sampling", "bogus"), 1), (("stream",), "yes"), (("enable_thinking",), 1), (("version",), 99), (("extra",), 1),
    (("type",), "generat"), (("type",), 3), (("prompt_token_ids",), [1, 2]), (("messages",), [{"role": "wizard"}]),
    (("prompt",), None), (("sampling", "stop_token_ids"), [-1]),
]  # fmt: skip


def fuzz_cases(rng, n: int) -> list[bytes]:
    """Messages that must each get exactly one Error reply."""
    cases = []
    for k in range(n):
        kind = k % 7
        if kind == 0:  # random bytes
            cases.append(rng.randbytes(rng.randrange(1, 300)))
        elif kind == 1:  # a valid message, truncated
            data = p.encode(msgspec.convert(_valid_request(rng), p.GenerateRequest))
            cases.append(data[: rng.randrange(1, len(data))])
        elif kind in (2, 3):  # a wrong type or value somewhere
            message = _valid_request(rng)
            path, value = rng.choice(_WRONG)
            if path[0] == "messages":
                message.pop("prompt")
            target = message
            for key in path[:-1]:
                target = target[key]
            if value is None:
                target.pop(path[-1])
            else:
                target[path[-1]] = value
            cases.append(msgspec.msgpack.encode(message))
        elif kind == 4:  # not a message at all
            cases.append(msgspec.msgpack.encode(rng.choice([[1, 2], 7, "generate", None, {"type": None}, {},
                                                            {"type": "cancel"}, {"type": "delta", "request_id": "x"},
                                                            [[[[[[[[]]]]]]]]])))  # fmt: skip
        elif kind == 5:  # prompts longer than the context, or ids outside the vocabulary
            message = _valid_request(rng)
            del message["prompt"]
            if rng.random() < 0.5:
                message["prompt_token_ids"] = [1] * rng.randrange(4097, 6000)
            else:
                message["prompt_token_ids"] = [rng.randrange(1408, 2**31 - 1)]
            cases.append(msgspec.msgpack.encode(message))
        else:  # the right shape, unknown tag or cancel/health with junk
            cases.append(msgspec.msgpack.encode({"type": rng.choice(["nope", "health", "GENERATE", ""]), "x": 1}))
    return cases


def test_bad_input_gets_one_error_each_and_others_keep_being_served(server):
    import random

    rng = random.Random(1234)
    cases = fuzz_cases(rng, 3000)
    cases += [b"\x00" * (p.MAX_MESSAGE_BYTES + 1)]  # huge
    good_results = []

    def good_client():
        with Client(server.address, timeout_s=60) as client:
            for i in range(20):
                good_results.append(client.complete(f"good {i}", max_tokens=3, ignore_eos=True))

    thread = threading.Thread(target=good_client)
    thread.start()
    sock = raw_socket(server.address)
    errors = []
    for i, data in enumerate(cases):
        sock.send(data)
        if i % 100 == 99:  # do not queue everything at once: interleave with the good client
            while sock.poll(0):
                errors.append(p.decode_server(sock.recv()))
    while len(errors) < len(cases):
        errors.append(recv(sock))
    assert not sock.poll(300)
    bad = [(c[:60], e) for c, e in zip(cases, errors) if not isinstance(e, p.Error) or e.code not in
           ("bad_request", "too_long")]  # fmt: skip
    assert not bad, bad[:3]
    assert "exceeds the limit" in errors[-1].message
    assert any("exceed the context" in e.message for e in errors) and any("vocabulary" in e.message for e in errors)
    # multi-frame and empty messages
    sock.send_multipart([p.encode(p.HealthCheck()), b"more"])
    assert "one message frame" in recv(sock).message
    sock.send(b"")
    assert recv(sock).code == "bad_request"
    thread.join(120)
    assert len(good_results) == 20 and all(f.usage.completion_tokens == 3 for f in good_results)
    with Client(server.address, timeout_s=10) as client:
        assert client.health().ok


def test_duplicate_request_id_in_flight_is_refused(server):
    sock = raw_socket(server.address)
    request = p.GenerateRequest("dup", prompt="x", sampling=p.WireSampling(max_tokens=3000, ignore_eos=True))
    sock.send(p.encode(request))
    sock.send(p.encode(request))
    messages = [recv(sock) for _ in range(3)]
    errors = [m for m in messages if isinstance(m, p.Error)]
    assert len(errors) == 1 and "already in flight" in errors[0].message
    sock.send(p.encode(p.Cancel("dup")))
    while not isinstance(recv(sock), p.Final):
        pass
    sock.close()


# ---- faults ----------------------------------------------------------------------------------------
def _stream_until_error(address: str, results: list, started: threading.Event) -> None:
    with Client(address, timeout_s=30) as client:
        stream = client.generate("doomed", max_tokens=3500, ignore_eos=True)
        try:
            next(stream)
            started.set()
            for _ in stream:
                pass
            results.append(("final", time.monotonic()))
        except RequestError as e:
            results.append((e.code, time.monotonic()))
        except TimeoutError:
            results.append(("timeout", time.monotonic()))


def _kill_mid_stream(server: ServerProcess, victim: str) -> tuple[str, float]:
    results, started = [], threading.Event()
    thread = threading.Thread(target=_stream_until_error, args=(server.address, results, started))
    thread.start()
    assert started.wait(30), results
    before = len(server.lines)
    killed_at = time.monotonic()
    os.kill(server.pids[victim], signal.SIGKILL)
    thread.join(40)
    code, at = results[0]
    return code, at - killed_at, before


@pytest.mark.parametrize("victims", [("worker", "detokenizer", "tokenizer")])
def test_kill_9_each_child_mid_stream_errors_then_recovers(tiny_dir, victims):
    with ServerProcess(["--model", str(tiny_dir), "--port", "0", "--max-restarts", "5"], START_S) as server:
        for victim in victims:
            code, after_s, before = _kill_mid_stream(server, victim)
            assert code == "unavailable" and after_s < 5.0, (victim, code, after_s)
            server.wait_ready(60, after=before)
            with Client(server.address, timeout_s=30) as client:
                assert client.health().ok
                final = client.complete("alive again", max_tokens=4, ignore_eos=True)
                assert final.usage.completion_tokens == 4
        assert server.stop() == 0


def test_a_death_beyond_max_restarts_exits_nonzero(tiny_dir):
    server = ServerProcess(["--model", str(tiny_dir), "--port", "0", "--max-restarts", "0"], START_S)
    try:
        code, after_s, _ = _kill_mid_stream(server, "worker")
        assert code == "unavailable" and after_s < 5.0
        assert server.proc.wait(30) == 1
        assert any("exiting" in line for line in server.lines)
    finally:
        server.proc.kill()


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_dir):
    server = ServerProcess(["--model", str(tiny_dir), "--port", "0"], START_S)
    try:
        with Client(server.address, timeout_s=30) as client:
            streams = [client.generate(f"drain {i}", max_tokens=1500, ignore_eos=True) for i in range(3)]
            for s in streams:
                next(s)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(RequestError, match="unavailable: the server is shutting down"):
                client.complete("too late", max_tokens=2)
            for s in streams:
                for _ in s:
                    pass
                assert s.final.finish_reason == "length" and s.final.usage.completion_tokens == 1500
        assert server.proc.wait(30) == 0
    finally:
        server.proc.kill()


def test_sigterm_drain_is_bounded_by_its_timeout(tiny_dir):
    server = ServerProcess(["--model", str(tiny_dir), "--port", "0", "--drain-timeout", "1"], START_S)
    try:
        with Client(server.address, timeout_s=30) as client:
            stream = client.generate("endless", max_tokens=3900, ignore_eos=True)
            next(stream)
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(RequestError, match="not finished within the 1 s drain"):
                for _ in stream:
                    pass
        assert server.proc.wait(30) == 0
    finally:
        server.proc.kill()


# ---- security ----------------------------------------------------------------------------------------
def test_non_loopback_bind_needs_curve_keys(tiny_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "glm5c.cli", "serve", "--model", str(tiny_dir), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "--curve-keys" in run.stderr and "Traceback" not in run.stderr
    keys = tmp_path / "keys"
    assert subprocess.run([sys.executable, "-m", "glm5c.cli", "keys", "--out", str(keys)], timeout=60).returncode == 0
    again = subprocess.run([sys.executable, "-m", "glm5c.cli", "keys", "--out", str(keys)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.returncode == 2 and "already holds keys" in again.stderr
    args = ["--model", str(tiny_dir), "--host", "0.0.0.0", "--port", "0", "--curve-keys", str(keys)]
    with ServerProcess(args, START_S) as server:
        port = server.address.rsplit(":", 1)[1]
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=30, curve_keys=keys) as client:
            assert client.complete("secret", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=5) as plain:  # no keys: the server drops the connection
            with pytest.raises((RequestError, TimeoutError)):
                plain.health()


# ---- the detokenizer's logic, with scripted tokens ------------------------------------------------
class _Frames:
    def __init__(self) -> None:
        self.sent: list = []

    def send_multipart(self, frames) -> None:
        self.sent.append(frames)

    def send(self, data) -> None:
        self.sent.append(data)


@pytest.mark.parametrize("stream", [True, False])
def test_detokenizer_parses_reasoning_and_tool_calls_without_splitting_markers(tiny_dir, stream):
    from glm5c.serve.detokenizer_proc import Detokenizer
    from glm5c.serve.messages import Accepted, Outputs, RequestSpec, TokenOutput, encoder
    from glm5c.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    output = ("Let me think: é ✓.</think>Sure, checking.<tool_call>get_weather<arg_key>city</arg_key>"
              "<arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")  # fmt: skip
    ids = tokenizer.encode(output, add_special_tokens=False)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]  # fmt: skip
    replies, worker = _Frames(), _Frames()
    detok = Detokenizer(tokenizer, 0, replies, worker)
    spec = RequestSpec(b"client", "r", stream, time.monotonic(), 5, chat=True, thinking=True, tools=tools)
    detok.handle(encoder.encode(Accepted("k", spec)))
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        detok.handle(encoder.encode(Outputs([TokenOutput("k", [t], last, "stop" if last else None)], 0.0)))
    messages = [p.decode_server(frames[-1]) for frames in replies.sent]
    assert all(f[:4] == [b"0", b"client", b"r", b"1" if isinstance(m, p.Final) else b"0"]
               for f, m in zip(replies.sent, messages))  # fmt: skip
    *deltas, final = messages
    assert isinstance(final, p.Final) and final.usage.completion_tokens == len(ids)
    if stream:
        reasoning, text = "".join(d.reasoning for d in deltas), "".join(d.text for d in deltas)
        calls = [c for d in deltas for c in d.tool_calls]
        assert len(calls) == 1 and calls[0].index == 0
        call = {"name": calls[0].name, "arguments": msgspec.json.decode(calls[0].arguments)}
        for d in deltas:
            for marker in ("<", "</think>", "tool_call", "arg_"):
                assert marker not in d.text and marker not in d.reasoning, d
    else:
        assert not deltas
        reasoning, text, (call,) = final.reasoning, final.text, final.tool_calls
    assert reasoning == "Let me think: é ✓." and text == "Sure, checking."
    assert call == {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
    assert not worker.sent


def test_detokenizer_stop_string_finishes_and_aborts_in_the_worker(tiny_dir):
    from glm5c.serve.detokenizer_proc import Detokenizer
    from glm5c.serve.messages import Abort, Accepted, Outputs, RequestSpec, TokenOutput, encoder, worker_decoder
    from glm5c.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    ids = tokenizer.encode("one two STOP three four", add_special_tokens=False)
    replies, worker = _Frames(), _Frames()
    detok = Detokenizer(tokenizer, 3, replies, worker)
    detok.handle(encoder.encode(Accepted("k", RequestSpec(b"c", "r", True, time.monotonic(), 2, stop=["STOP"]))))
    for t in ids:
        detok.handle(encoder.encode(Outputs([TokenOutput("k", [t], False, None)], 0.0)))
    detok.handle(encoder.encode(Outputs([TokenOutput("k", [], True, "cancelled")], 0.0)))  # the abort's echo
    messages = [p.decode_server(frames[-1]) for frames in replies.sent]
    assert "".join(m.text for m in messages if isinstance(m, p.Delta)) == "one two "
    finals = [m for m in messages if isinstance(m, p.Final)]
    assert len(finals) == 1 and finals[0].finish_reason == "stop" and isinstance(messages[-1], p.Final)
    assert [worker_decoder.decode(m) for m in worker.sent] == [Abort(3, "k")]


# ---- start-up failures --------------------------------------------------------------------------
def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm5c.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_bad_serve_flags_are_refused_before_anything_starts(tiny_dir, tmp_path):
    for args, message in [
        (["--model", str(tmp_path)], "is not a model directory"),
        (["--model", str(tiny_dir), "--artifacts", str(tmp_path)], "no manifest.json"),
        (["--model", str(tiny_dir), "--port", "70000"], "port 70000"),
        (["--model", str(tiny_dir), "--max-restarts", "-1"], "max_restarts must be >= 0"),
    ]:
        run = _serve(*args)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_child_that_cannot_start_says_why_and_the_server_exits_1(tiny_dir):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        run = _serve("--model", str(tiny_dir), "--port", str(taken.getsockname()[1]))
    finally:
        taken.close()
    assert run.returncode == 1, run.stderr
    assert "the tokenizer cannot start: cannot listen on tcp://127.0.0.1:" in run.stderr
    assert "exited with status 2 while starting" in run.stderr and "Traceback" not in run.stderr


def test_worker_rejects_what_the_engine_cannot_hold_as_too_long(tiny_dir):
    """The tokenizer checks the context; the worker still refuses a request needing more KV blocks
    than the cache has (code too_long), and a bad sampling field (bad_request), naming the client's id."""
    from glm5c.engine import Engine, EngineConfig
    from glm5c.serve.messages import Rejected, RequestSpec, Submit, detokenizer_decoder
    from glm5c.serve.worker_proc import Worker

    sent = _Frames()
    worker = Worker(Engine(tiny_dir, config=EngineConfig(block_size=4, num_blocks=3)), None, sent, epoch=0)
    spec = RequestSpec(b"c", "mine", True, 0.0, 8)
    worker.submit(Submit(0, "63/mine", [1] * 8, {"max_tokens": 16}, spec))
    worker.submit(Submit(0, "63/mine2", [1] * 8, {"max_tokens": 0}, spec))
    first, second = (detokenizer_decoder.decode(m) for m in sent.sent)
    assert isinstance(first, Rejected) and first.code == "too_long" and "'mine'" in first.message
    assert isinstance(second, Rejected) and second.code == "bad_request" and "max_tokens" in second.message
