"""The wire protocol: every message between glm5c's processes and its clients, as msgspec Structs.

Version PROTOCOL_VERSION. Messages are msgpack-encoded tagged unions (the tag is the field
`type`); a decoder accepts exactly the union it expects and rejects anything else — unknown
tags, wrong types, out-of-range values, extra fields — with a `ProtocolError` naming the
problem. This module imports nothing of the engine, so clients can use it alone.

Client -> server (`ClientMessage`):
  GenerateRequest  one request: exactly one of `prompt` (text), `messages` (chat turns, rendered
                   with GLM-5's chat template; `tools` and `enable_thinking` apply) or
                   `prompt_token_ids`; `sampling` parameters; `stream` (deltas as they come, or
                   only the final message); `request_id`, unique per client connection.
  Cancel           stop a request; its final message says "cancelled".
  HealthCheck      -> Health.      StatsRequest -> Stats.

Server -> client (`ServerMessage`): for each request, zero or more `Delta`s (when streaming),
then exactly one of `Final` or `Error`; plus `Health` and `Stats` replies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 << 20  # a request larger than this is refused before decoding

RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
TokenId = Annotated[int, Meta(ge=0, lt=2**31)]


class WireSampling(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling parameters as sent; the server checks them again with the model's limits."""

    max_tokens: Annotated[int, Meta(ge=1, le=1 << 20)] = 256
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1)] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] = 1.0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    seed: int | None = None
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=16)] = []
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] = []
    ignore_eos: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


class ChatMessage(Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: Literal["system", "user", "assistant", "tool", "observation"]
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI shape: {"function": {"name", "arguments"}}


class GenerateRequest(Struct, tag="generate", tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    request_id: RequestId
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Meta(max_length=4096)] | None = None
    prompt_token_ids: Annotated[list[TokenId], Meta(max_length=1 << 20)] | None = None
    tools: list[dict[str, Any]] | None = None  # JSON schemas, with `messages`
    enable_thinking: bool = True  # with `messages`: `<think>` (on) or `</think>` (off) after <|assistant|>
    sampling: WireSampling = msgspec.field(default_factory=WireSampling)
    stream: bool = True
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools need messages (they are rendered by the chat template)")
        if self.version != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.version} is not supported (this server speaks {PROTOCOL_VERSION})")


class Cancel(Struct, tag="cancel", tag_field="type", forbid_unknown_fields=True):
    request_id: RequestId


class HealthCheck(Struct, tag="health_check", tag_field="type", forbid_unknown_fields=True):
    pass


class StatsRequest(Struct, tag="stats_request", tag_field="type", forbid_unknown_fields=True):
    pass


class ToolCallDelta(Struct, omit_defaults=True):
    index: int  # which call of the response
    name: str | None = None  # sent once, first
    arguments: str = ""  # JSON text, in pieces


class TokenLogprob(Struct):
    token_id: int
    logprob: float
    top: dict[int, float]


class Delta(Struct, tag="delta", tag_field="type", omit_defaults=True):
    request_id: str
    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = []
    tool_calls: list[ToolCallDelta] = []
    logprobs: list[TokenLogprob] | None = None


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


class Timings(Struct):
    queue_s: float
    ttft_s: float  # time to the first token, from arrival
    per_token_s: float  # mean time between tokens after the first


class Final(Struct, tag="final", tag_field="type", omit_defaults=True):
    request_id: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timings: Timings
    text: str = ""  # the whole text when not streaming
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = []  # parsed calls: {"name", "arguments" (a JSON object)}


ErrorCode = Literal["bad_request", "too_long", "queue_full", "cancelled", "internal", "unavailable"]


class Error(Struct, tag="error", tag_field="type"):
    request_id: str | None  # None when the message could not be read far enough to know it
    code: ErrorCode
    message: str


class Health(Struct, tag="health", tag_field="type"):
    ok: bool
    version: int = PROTOCOL_VERSION
    detail: str = ""


class Stats(Struct, tag="stats", tag_field="type"):
    running: int
    waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    generated_tokens: int
    max_model_len: int = 0  # the longest prompt + max_tokens the server accepts
    vocab_size: int = 0  # token ids must be below this
    compilations: int = 0  # graphs the serving worker compiled since it started (0 with valid artifacts)
    draft_acceptance_rate: float = 0.0  # MTP speculative decoding: accepted / drafted tokens (0 when off)
    draft_mean_accept_length: float = 0.0  # tokens emitted per verify step per request (0 when off)


ClientMessage = Union[GenerateRequest, Cancel, HealthCheck, StatsRequest]
ServerMessage = Union[Delta, Final, Error, Health, Stats]


class ProtocolError(ValueError):
    """A message that does not decode; the text names the problem."""


_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)


def encode(message: Struct) -> bytes:
    return _encoder.encode(message)


def decode_client(data: bytes) -> ClientMessage:
    return _decode(_client_decoder, data)


def decode_server(data: bytes) -> ServerMessage:
    return _decode(_server_decoder, data)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes):
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ProtocolError(str(e)) from None
    except ValueError as e:  # raised by a message's own __post_init__ checks
        raise ProtocolError(str(e)) from None
