"""GLM-5's chat format: chat turns (+ tools, thinking on/off) -> prompt token ids, through the
chat template that ships with the tokenizer (`tokenizer_config.json` / `chat_template.jinja`).

The rendered text ends with `<|assistant|>` and then `<think>` (thinking on) or `</think>`
(thinking off), so the model's output starts inside the reasoning or directly with the answer.
"""

from __future__ import annotations

from typing import Any


class ChatError(ValueError):
    """The messages could not be rendered (the text names the problem)."""


def render_chat(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, enable_thinking: bool = True
) -> str:
    """-> the prompt text for `messages` (dicts with role / content / reasoning_content / tool_calls)."""
    if tokenizer is None:
        raise ChatError("this model has no tokenizer, so it cannot render chat messages: send prompt_token_ids")
    if not messages:
        raise ChatError("messages is empty")
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
    except Exception as e:  # jinja raises many kinds (TemplateError, TypeError, KeyError ...)
        raise ChatError(f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise ChatError(f"the chat template returned {type(text).__name__}, not text")
    return text


def chat_token_ids(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, enable_thinking: bool = True
) -> list[int]:
    """-> the prompt token ids: the rendered text, encoded without adding special tokens again."""
    return tokenizer.encode(render_chat(tokenizer, messages, tools, enable_thinking), add_special_tokens=False)
