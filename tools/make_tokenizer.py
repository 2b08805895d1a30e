"""Build a small, deterministic stand-in for the GLM-5 tokenizer.

The real GLM-5 tokenizer (a Hugging Face ``tokenizer.json`` with ~155k entries) cannot be
downloaded here, yet the tests and the built-in default model need a tokenizer that the real
loading code (``transformers.AutoTokenizer.from_pretrained``) accepts. This module trains a tiny
byte-level BPE on a built-in English + code corpus and writes it next to a ``tokenizer_config.json``
that carries GLM-5's special tokens (same strings, small ids) and a chat template reproducing
GLM-5's prompt format. Every run writes the same bytes.

Usage: ``python tools/make_tokenizer.py OUT_DIR [--vocab-size N]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# GLM's control tokens, in GLM's own id order; they get ids 0.. here. GLM-4.5/4.6 tokenizer
# configs mark these `special: true` (skipped by decode(skip_special_tokens=True)).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>",
)
# Reasoning / tool-call markers follow. GLM registers them as added tokens with `special: false`,
# so they are never split and survive decoding even with skip_special_tokens=True, which is what
# the reasoning and tool-call parsers read.
MARKER_TOKENS: tuple[str, ...] = (
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
)
RESERVED_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + MARKER_TOKENS
# GLM-5's generation_config eos ids are [<|endoftext|>, <|user|>, <|observation|>].
EOS_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|user|>", "<|observation|>")
PAD_TOKEN = "<|endoftext|>"

# Pre-tokenizer split: the llama-3 style pattern that llama.cpp uses for GLM-4 ("glm4"), followed
# by a byte-level mapping without its own regex, as in GLM's tokenizer.json (inferred from
# public converters, not from GLM-5's file itself).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GLM-5 prompt format, written as explicit string outputs so that the template's own layout and
# jinja's trim_blocks/lstrip_blocks settings cannot change the result. It follows the public
# GLM-4.7 / GLM-5 chat_template.jinja: no newline after role markers; history assistant turns
# keep their reasoning only after the last user turn (or with clear_thinking=false) and otherwise
# get a bare `</think>`; content is stripped; tool calls follow the content with no separators;
# argument values are raw strings or JSON; consecutive tool results share one <|observation|>.
# Inferred/simplified: `None` content renders as empty (later GLM template revisions), list-valued
# tool results render like other content, and tool-call arguments must be mappings (parse
# OpenAI-style JSON strings before templating).
CHAT_TEMPLATE = r"""
{%- macro text(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- elif content is iterable and content is not mapping -%}
    {%- for part in content -%}
      {%- if part is string -%}{{- part -}}
      {%- elif part is mapping and part.type == 'text' -%}{{- part.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- elif content is not none -%}{{- content -}}
  {%- endif -%}
{%- endmacro -%}
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
  {{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}
  {%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) -}}{{- '\n' -}}{%- endfor -%}
  {{- '</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n' -}}
  {{- '<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>' -}}
  {{- '<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{{- '<|system|>' + text(m.content) -}}
  {%- elif m.role == 'user' -%}{{- '<|user|>' + text(m.content) -}}
  {%- elif m.role == 'assistant' -%}
    {%- set content = text(m.content) -%}
    {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- if m.reasoning_content is not string and '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {{- '<|assistant|>' -}}
    {%- if reasoning.strip() and (loop.index0 > ns.last_user or (clear_thinking is defined and not clear_thinking)) -%}
      {{- '<think>' + reasoning.strip() + '</think>' -}}
    {%- else -%}
      {{- '</think>' -}}
    {%- endif -%}
    {{- content.strip() -}}
    {%- for tc in m.tool_calls or [] -%}
      {%- set call = tc.function if tc.function is defined else tc -%}
      {{- '<tool_call>' ~ call.name -}}
      {%- if call.arguments is mapping -%}
        {%- for key, value in call.arguments.items() -%}
          {{- '<arg_key>' ~ key ~ '</arg_key><arg_value>' -}}
          {{- value if value is string else value | tojson(ensure_ascii=False) -}}
          {{- '</arg_value>' -}}
        {%- endfor -%}
      {%- elif call.arguments -%}
        {{- raise_exception('tool call arguments must be a mapping, not a JSON string') -}}
      {%- endif -%}
      {{- '</tool_call>' -}}
    {%- endfor -%}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}
    {{- '<tool_response>' + text(m.content) + '</tool_response>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|>' + ('</think>' if enable_thinking is defined and not enable_thinking else '<think>') -}}
{%- endif -%}
""".strip()

# Training text: varied English prose, code and JSON, so common words and syntax get merges.
_CORPUS = r'''
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Language models predict the next token from the tokens that came before it.
The weather today is sunny with a light breeze from the west; tomorrow it may rain in the afternoon.
Please summarize the following article in three sentences and list the key points.
She opened the window, looked at the harbor, and counted the boats coming home before dark.
In mathematics, a prime number is a natural number greater than one that has no positive divisors
other than one and itself. The first few primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29.
Water boils at 100 degrees Celsius at sea level, but at lower temperatures on high mountains.
The library closes at six o'clock on weekdays and at noon on Saturdays. It's closed on Sundays.
I think the answer is forty-two, but let me check the calculation again to be sure.
First, read the question carefully. Then, break the problem into smaller steps and solve each one.
Could you help me write an email to my manager asking for two days off next week?
The museum has paintings, sculptures, and an exhibition about the history of the city.
Thank you for your question! Here is a short explanation with an example.
The server returned an error because the request was missing a required parameter.
We measured the latency of each request and found that the cache reduced it by half.
He wasn't sure whether they'd arrive on time, so he called the station and asked about delays.
Users can search for flights, compare prices, and book tickets directly from the application.
The algorithm sorts the list in place and runs in O(n log n) time on average.
Attention layers compute weighted sums of value vectors, where weights come from queries and keys.
The experts in a mixture-of-experts layer are selected by a router for every token.
Let's think step by step: if Alice has 3 apples and buys 5 more, she has 8 apples in total.
The function should return None when the input is empty, and raise ValueError for bad values.
To install the package, run pip install in a virtual environment, then import it in Python.
The report is due on Friday, March 14th; please send comments before Wednesday evening.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


class Stack:
    def __init__(self) -> None:
        self.items: list[object] = []

    def push(self, item: object) -> None:
        self.items.append(item)

    def pop(self) -> object:
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


import json
import os

def load_config(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)

for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

async function fetchUser(id) {
  const response = await fetch(`/api/users/${id}`);
  if (!response.ok) {
    throw new Error("request failed: " + response.status);
  }
  return response.json();
}

const total = items.filter((x) => x.price > 10).map((x) => x.price).reduce((a, b) => a + b, 0);

#include <stdio.h>
int main(void) {
    int sum = 0;
    for (int i = 0; i < 100; i++) {
        sum += i;
    }
    printf("sum = %d\n", sum);
    return 0;
}

SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id
WHERE orders.created_at > '2024-01-01' GROUP BY name ORDER BY orders DESC LIMIT 10;

{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.",
"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"},
"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
{"name": "search", "arguments": {"query": "latest news", "max_results": 5, "safe": true, "filters": null}}
{"temperature": 21.5, "humidity": 0.63, "conditions": "partly cloudy", "forecast": [18, 20, 23]}

$ git clone https://github.com/example/project.git && cd project
$ python -m pytest -q tests/
$ export PATH="$HOME/.local/bin:$PATH"
# Heading
- item one
- item two with **bold** and `inline code`
| column | value |
|--------|-------|
| alpha  | 0.5   |
'''


def _train(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE; specials and markers take ids 0.., the byte alphabet follows."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(RESERVED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.strip().splitlines(), trainer)
    # The trainer registers every reserved token as special; re-add the markers as plain added
    # tokens (same ids) so they survive decode(skip_special_tokens=True), as in GLM.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
    return tokenizer


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": EOS_TOKENS[0],
        "pad_token": PAD_TOKEN,
        "extra_special_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 2048) -> list[int]:
    """Write the tokenizer files into ``out_dir``; return the eos token ids.

    The total vocabulary (specials included) is at most ``vocab_size``. The returned ids are those
    of ``<|endoftext|>``, ``<|user|>`` and ``<|observation|>``, mirroring GLM-5's eos ids.
    """
    minimum = len(RESERVED_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum}, got {vocab_size}")
    tokenizer = _train(vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", {"eos_token": EOS_TOKENS[0], "pad_token": PAD_TOKEN})
    eos_ids = [RESERVED_TOKENS.index(token) for token in EOS_TOKENS]  # reserved ids are 0.. in order
    assert eos_ids == [tokenizer.token_to_id(token) for token in EOS_TOKENS]
    return eos_ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the tokenizer files into")
    parser.add_argument("--vocab-size", type=int, default=2048, help="maximum total vocabulary size")
    args = parser.parse_args(argv)
    eos_ids = build_tokenizer(args.out_dir, args.vocab_size)
    print(f"wrote tokenizer to {args.out_dir}; eos token ids {eos_ids}")


if __name__ == "__main__":
    main()
