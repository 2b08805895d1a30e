"""Token buckets: every step runs a graph compiled for a fixed number of tokens, the smallest
bucket that holds the step's tokens (decodes count 1 + MTP drafts per request; prefill chunks
count their tokens). The rest of the bucket is padding that never changes real outputs."""

from __future__ import annotations

from dataclasses import dataclass

# like vLLM's capture sizes: 1, 2, 4, then every 8 up to 256, then prefill chunks
GPU_DEFAULT = (1, 2, 4, *range(8, 257, 8), 512, 1024, 2048)
# a CPU compiles each bucket in ~10-20 s, so fewer of them
CPU_DEFAULT = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Buckets:
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"buckets must be positive token counts, got {list(self.sizes)}")
        object.__setattr__(self, "sizes", tuple(sorted(set(self.sizes))))

    @classmethod
    def parse(cls, text: str) -> "Buckets":
        """'1,2,4,8' -> Buckets((1, 2, 4, 8))."""
        try:
            return cls(tuple(int(s) for s in text.split(",") if s.strip()))
        except ValueError:
            raise ValueError(f"buckets must be a comma-separated list of token counts, got {text!r}") from None

    @classmethod
    def default(cls, device: str) -> "Buckets":
        return cls(GPU_DEFAULT if device.startswith("cuda") else CPU_DEFAULT)

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def pick(self, num_tokens: int) -> int:
        """The smallest bucket holding num_tokens."""
        for size in self.sizes:
            if size >= num_tokens:
                return size
        raise ValueError(f"a step of {num_tokens} tokens exceeds the largest bucket ({self.largest})")
