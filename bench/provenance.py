"""Where a benchmark result came from: date, machine, git commit and the command that produced it."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return text


def provenance() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    return {"date": time.strftime("%Y%m%d-%H%M%S"), "machine": machine(), "git_commit": commit or None,
            "command": shlex.join([_program(), *sys.argv[1:]])}  # fmt: skip


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "glm5c" if name in ("glm5c", "cli.py") else sys.argv[0]
