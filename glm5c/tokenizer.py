"""The model directory's Hugging Face tokenizer, when it has one."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model_dir: str | Path):
    """-> a transformers tokenizer, or None when the directory has no tokenizer files
    (such a model still serves prompts given as token ids)."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises many kinds; name the directory and the cause
        raise ValueError(f"cannot load the tokenizer in {model_dir}: {type(e).__name__}: {e}") from None
