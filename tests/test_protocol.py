"""The wire protocol: every message round-trips, and every malformed message is a ProtocolError
that names the problem (never another exception)."""

from __future__ import annotations

import random

import msgspec
import pytest

from glm5c import protocol as p


def test_round_trips():
    messages = [
        p.GenerateRequest("r1", prompt="hi", sampling=p.WireSampling(max_tokens=4, temperature=0.0, stop=["\n"])),
        p.GenerateRequest("r2", messages=[p.ChatMessage("user", "hi")], tools=[{"type": "function"}],
                          enable_thinking=False, stream=False),  # fmt: skip
        p.GenerateRequest("r3", prompt_token_ids=[1, 2, 3]),
        p.Cancel("r1"),
        p.HealthCheck(),
        p.StatsRequest(),
    ]
    for m in messages:
        assert p.decode_client(p.encode(m)) == m
    replies = [
        p.Delta("r1", text="he", token_ids=[5], tool_calls=[p.ToolCallDelta(0, name="f")],
                logprobs=[p.TokenLogprob(5, -0.1, {5: -0.1})]),  # fmt: skip
        p.Final("r1", "stop", p.Usage(3, 2), p.Timings(0.001, 0.01, 0.005), text="hello"),
        p.Error("r1", "bad_request", "max_tokens must be >= 1"),
        p.Health(True),
        p.Stats(1, 0, 10, 20, 0.5, 7),
    ]
    for m in replies:
        assert p.decode_server(p.encode(m)) == m


@pytest.mark.parametrize(
    "message, problem",
    [
        ({"type": "generate", "request_id": "a"}, "exactly one of prompt, messages, prompt_token_ids"),
        ({"type": "generate", "request_id": "a", "prompt": "x", "prompt_token_ids": [1]}, "exactly one of"),
        ({"type": "generate", "request_id": "a", "prompt": "x", "tools": []}, "tools need messages"),
        ({"type": "generate", "request_id": "", "prompt": "x"}, "request_id"),
        ({"type": "generate", "request_id": "a", "prompt": 5}, "Expected `str | null`"),
        ({"type": "generate", "request_id": "a", "prompt": "x", "sampling": {"max_tokens": 0}}, "max_tokens"),
        ({"type": "generate", "request_id": "a", "prompt": "x", "sampling": {"top_p": 0.0}}, "top_p"),
        ({"type": "generate", "request_id": "a", "prompt": "x", "sampling": {"temperature": -1}}, "temperature"),
        ({"type": "generate", "request_id": "a", "prompt": "x", "sampling": {"bogus": 1}}, "bogus"),
        ({"type": "generate", "request_id": "a", "prompt_token_ids": [-1]}, "prompt_token_ids"),
        ({"type": "generate", "request_id": "a", "prompt": "x", "version": 99}, "protocol version 99"),
        ({"type": "generate", "request_id": "a", "messages": [{"role": "robot"}]}, "role"),
        ({"type": "launch_missiles"}, "Invalid value 'launch_missiles'"),
        ({"request_id": "a"}, "type"),
        ({"type": "cancel"}, "request_id"),
        ([1, 2, 3], "Expected `object`"),
    ],
)
def test_bad_messages_name_the_problem(message, problem):
    with pytest.raises(p.ProtocolError, match=problem):
        p.decode_client(msgspec.msgpack.encode(message))


def test_truncated_huge_and_random_bytes_are_protocol_errors():
    good = p.encode(p.GenerateRequest("r", prompt="hello there"))
    with pytest.raises(p.ProtocolError):
        p.decode_client(good[:-3])
    with pytest.raises(p.ProtocolError, match="exceeds the limit"):
        p.decode_client(b"\x00" * (p.MAX_MESSAGE_BYTES + 1))
    rng = random.Random(0)
    for _ in range(3000):  # random bytes and random mutations of a good message
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        if rng.random() < 0.5:
            mutated = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated)
        try:
            p.decode_client(data)
        except p.ProtocolError:
            pass  # the only exception allowed
