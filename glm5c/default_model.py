"""The built-in default model: a ~60M-parameter GLM-5-architecture checkpoint (`mini` preset,
tokenizer included) that glm5c makes deterministically the first time a command runs without
`--model`, so everything works on a laptop CPU with nothing downloaded."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_PRESET = "mini"
DEFAULT_SEED = 0
_VERSION = "v3"  # bump when the maker's output changes, so old copies are not reused


def cache_home() -> Path:
    if os.environ.get("GLM5C_HOME"):
        return Path(os.environ["GLM5C_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glm5c"


def default_model_dir() -> Path:
    """The default checkpoint's directory, made on first use (atomically: concurrent first uses
    each build a private copy and one of them wins the rename)."""
    target = cache_home() / f"default-{DEFAULT_PRESET}-{_VERSION}"
    if (target / "config.json").is_file():
        return target
    from glm5c.tools.make_tiny_checkpoint import make_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"glm5c: making the built-in {DEFAULT_PRESET} model in {target} (first use only)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".making-", dir=target.parent))
    try:
        make_checkpoint(tmp / "model", preset=DEFAULT_PRESET, seed=DEFAULT_SEED)
        try:
            os.rename(tmp / "model", target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
