"""Streaming output: incremental detokenization (multi-byte characters, stop strings) and GLM-5's
reasoning and tool-call parsers, checked by splitting the same output at every point."""

from __future__ import annotations

import pytest

from glm5c.detokenizer import IncrementalDetokenizer
from glm5c.parsers import OutputParser, ParsedDelta, parse_tool_call
from glm5c.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]  # fmt: skip
OUTPUT = ("Let me check the weather.</think>Sure, looking it up. <tool_call>get_weather<arg_key>city</arg_key>\n"
          "<arg_value>Oslo</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call> Done.")  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


def _stream(parser_text: str, pieces: list[str], **kw) -> tuple[ParsedDelta, list[ParsedDelta]]:
    parser = OutputParser(**kw)
    deltas = [parser.push(piece) for piece in pieces] + [parser.push("", final=True)]
    total = ParsedDelta()
    for d in deltas:
        total.reasoning += d.reasoning
        total.content += d.content
        total.tool_calls += d.tool_calls
    return total, deltas


def test_reasoning_content_and_tool_calls():
    whole, _ = _stream(OUTPUT, [OUTPUT], tools=TOOLS)
    assert whole.reasoning == "Let me check the weather."
    assert whole.content == "Sure, looking it up.  Done."
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("get_weather", {"city": "Oslo", "days": 2})]


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_any_split_gives_the_same_result_and_never_splits_a_marker(step):
    want, _ = _stream(OUTPUT, [OUTPUT], tools=TOOLS)
    for offset in range(step):
        pieces = [OUTPUT[:offset]] + [OUTPUT[i : i + step] for i in range(offset, len(OUTPUT), step)]
        got, deltas = _stream(OUTPUT, pieces, tools=TOOLS)
        assert (got.reasoning, got.content, got.tool_calls) == (want.reasoning, want.content, want.tool_calls)
        for d in deltas:  # no delta shows any part of a marker (the text itself has no "<")
            assert "<" not in d.reasoning + d.content


def test_thinking_off_and_unclosed_calls():
    got, _ = _stream("", ["plain answer</think>x"], thinking=False)
    assert got.reasoning == "" and got.content == "plain answer</think>x"
    got, _ = _stream("", ["</think>half <tool_call>f<arg_key>a"])
    assert got.content == "half <tool_call>f<arg_key>a" and not got.tool_calls


def test_argument_values_follow_the_schema():
    call = parse_tool_call("f<arg_key>s</arg_key><arg_value>[1, 2]</arg_value>"
                           "<arg_key>n</arg_key><arg_value>{'a': 1}</arg_value>"
                           "<arg_key>r</arg_key><arg_value>not json</arg_value>",  # fmt: skip
                           [{"name": "f", "parameters": {"properties": {"s": {"type": "string"}}}}])
    assert call.arguments == {"s": "[1, 2]", "n": {"a": 1}, "r": "not json"}


def test_detokenizer_streams_multibyte_text_exactly(tokenizer):
    text = "naïve café — 東京 🚀 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([i]) for i in ids] + [detok.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_are_cut_and_held_back(tokenizer):
    text = "alpha beta STOP gamma"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP", "zeta"])
    pieces = [detok.push([i]) for i in ids] + [detok.finish()]
    assert "".join(pieces) == "alpha beta " and detok.stopped_by == "STOP"
    assert not any("ST" in p for p in pieces)  # the stop string's start was never released
    detok = IncrementalDetokenizer(tokenizer, stop=["gam ma"])
    out = "".join([detok.push([i]) for i in ids] + [detok.finish()])
    assert out == text and detok.stopped_by is None  # a partial match is released at the end
    with pytest.raises(ValueError, match="must not be empty"):
        IncrementalDetokenizer(tokenizer, stop=[""])
