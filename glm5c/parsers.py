"""GLM-5's output parsers, streaming: reasoning (`glm45`) and tool calls (`glm47`).

Model output is `reasoning</think>answer` (the `<think>` is in the prompt), where the answer may
hold tool calls `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`.
`OutputParser.push(text)` splits each new piece of text into reasoning, content and completed
tool calls; text that could be the start of a marker is held back, so no delta ever splits one.
With thinking off, everything is content.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

THINK_END = "</think>"
THINK_START = "<think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_tool_call(body: str, tools: list[dict] | None = None) -> ToolCall:
    """The text between <tool_call> and </tool_call> -> name and arguments. Values stay strings
    when the tool's schema says string; otherwise they are read as JSON, then as a Python
    literal, then kept as the raw string."""
    name = body.split("<arg_key>", 1)[0].strip()
    types = _argument_types(name, tools)
    arguments: dict[str, Any] = {}
    for key, raw in _ARG.findall(body):
        key = key.strip()
        arguments[key] = raw if types.get(key) == "string" else _read_value(raw)
    return ToolCall(name, arguments)


def _argument_types(name: str, tools: list[dict] | None) -> dict[str, str]:
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return {}


def _read_value(raw: str) -> Any:
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return raw


class OutputParser:
    def __init__(self, thinking: bool = True, tools: list[dict] | None = None) -> None:
        self.in_reasoning = thinking
        self.tools = tools
        self._pending = ""  # text not yet classified (may hold the start of a marker)
        self._call: str | None = None  # the body of an open tool call
        self._started = False

    def push(self, text: str, final: bool = False) -> ParsedDelta:
        """Classify new text; with final=True, also flush what was held back."""
        out = ParsedDelta()
        self._pending += text
        while self._pending or (final and self._call is not None):
            if self.in_reasoning:
                if not self._started and self._pending.startswith(THINK_START):  # a repeated <think>
                    self._pending = self._pending[len(THINK_START) :]
                self._started = True
                if not self._take_until(THINK_END, out, "reasoning", final):
                    break
                self.in_reasoning = False
            elif self._call is None:
                if not self._take_until(CALL_START, out, "content", final):
                    break
                self._call = ""
            else:  # inside a tool call: its body stays off the stream until the call closes
                body = self._call + self._pending
                at = body.find(CALL_END)
                if at < 0:
                    if final:  # an unclosed call at the end is content after all
                        out.content += CALL_START + body
                        body = ""
                    self._call, self._pending = (None if final else body), ""
                    break
                out.tool_calls.append(parse_tool_call(body[:at], self.tools))
                self._call, self._pending = None, body[at + len(CALL_END) :]
        return out

    def _take_until(self, marker: str, out: ParsedDelta, kind: str, final: bool) -> bool:
        """Move text before `marker` to out.<kind>; -> True when the marker was found (and consumed)."""
        at = self._pending.find(marker)
        if at >= 0:
            setattr(out, kind, getattr(out, kind) + self._pending[:at])
            self._pending = self._pending[at + len(marker) :]
            return True
        keep = 0 if final else _partial_marker(self._pending, marker)
        setattr(out, kind, getattr(out, kind) + self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return False


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
