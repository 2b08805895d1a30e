"""The `glm5c generate` command (glm5c/cli.py), in-process and as `python -m glm5c.cli`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from glm5c.cli import main


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP barriers slow the tiny model ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_generate_json(tiny_dir, capsys):
    """--json prints one object per prompt with text, token_ids and finish_reason; stats go to stderr."""
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--prompt", "The fox",
               "--max-tokens", "4", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0
    lines = _json_lines(out)
    assert [line["prompt"] for line in lines] == ["hi", "The fox"]
    for line in lines:
        assert len(line["token_ids"]) == 4 and all(isinstance(t, int) for t in line["token_ids"])
        assert isinstance(line["text"], str)
        assert line["finish_reason"] == "length"
    assert f"model {tiny_dir} loaded" in err and "8 tokens" in err


def test_generate_matches_llm(tiny_dir, capsys):
    """The command's greedy output is LLM.generate's."""
    from glm5c import LLM, SamplingParams

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "5", "--json"]) == 0
    (line,) = _json_lines(capsys.readouterr().out)
    (expected,) = LLM(tiny_dir).generate("hi", SamplingParams(max_tokens=5, temperature=0.0))
    assert line["token_ids"] == expected.token_ids and line["text"] == expected.text


def test_generate_plain_text(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("'hi' -> ") and out.rstrip().endswith("[3 tokens, length]")


@pytest.mark.parametrize("flags, suffix", [([], "<think>"), (["--no-think"], "</think>")])
def test_generate_chat(tiny_dir, capsys, flags, suffix):
    """--chat wraps the prompt as a user turn in GLM-5's chat template (thinking on unless --no-think)."""
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--chat", *flags, "--max-tokens", "2", "--json"])
    assert rc == 0
    (line,) = _json_lines(capsys.readouterr().out)
    assert line["prompt"] == "[gMASK]<sop><|user|>hi<|assistant|>" + suffix
    assert len(line["token_ids"]) == 2


def test_chat_without_tokenizer(tiny_dir, tmp_path, capsys):
    no_tokenizer = shutil.ignore_patterns("tokenizer*", "special_tokens_map.json")
    bare = shutil.copytree(tiny_dir, tmp_path / "bare", ignore=no_tokenizer)
    assert main(["generate", "--model", str(bare), "--prompt", "hi", "--chat"]) == 2
    assert "glm5c: error: --chat needs a tokenizer" in capsys.readouterr().err


def test_missing_model_dir(tmp_path, capsys):
    """A missing model directory: exit code 2 and a one-line error, no traceback."""
    missing = tmp_path / "nope"
    assert main(["generate", "--model", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glm5c: error: ") and str(missing) in err and "does not exist" in err
    assert "Traceback" not in err


def test_bad_sampling_value(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--temperature", "-1"]) == 2
    assert "glm5c: error: SamplingParams.temperature=-1.0" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [("0", "0 must be >= 1"), ("x", "'x' is not an integer")])
def test_bad_max_tokens_is_usage_error(tiny_dir, capsys, value, message):
    """--max-tokens below 1 is rejected by argparse (exit 2) before any model is loaded."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(tiny_dir), "--max-tokens", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-tokens" in err and message in err


def test_command_required(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_module_entry_point(tiny_dir):
    """`python -m glm5c.cli generate ...` runs end to end in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "glm5c.cli", "generate", "--model", str(tiny_dir), "--prompt", "hi",
           "--max-tokens", "3", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    (line,) = _json_lines(proc.stdout)
    assert line["prompt"] == "hi" and len(line["token_ids"]) == 3 and line["finish_reason"] == "length"


def test_generate_rejects_bad_engine_flags_cleanly(tiny_dir, tmp_path, capsys):
    """Out-of-range --speculative-tokens and a missing --artifacts directory end with a one-line
    error and exit code 2, no traceback."""
    from glm5c.cli import main

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--speculative-tokens", "99"]) == 2
    err = capsys.readouterr().err
    assert "num_speculative_tokens must be in [0, 16]" in err and "Traceback" not in err
    assert main(["generate", "--model", str(tiny_dir), "--artifacts", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "not a glm5c artifact directory" in err and "Traceback" not in err
