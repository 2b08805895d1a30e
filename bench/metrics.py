"""Serving metrics from request timelines, with vLLM's definitions and names (`vllm bench serve`).

A request's timeline: when it was sent, when each streamed chunk arrived and how many tokens it
carried, and when it ended. From it:

  TTFT  time to first token: first chunk - sent
  E2EL  end-to-end latency: end - sent
  TPOT  time per output token after the first: (E2EL - TTFT) / (output tokens - 1), for requests
        with more than one output token
  ITL   inter-token latencies: the gaps between consecutive chunks (a chunk may carry several
        tokens, e.g. accepted MTP drafts; vLLM counts one gap per chunk too)

Percentiles interpolate linearly between order statistics (numpy's default); std is the
population standard deviation (numpy's default), as in vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestTimeline:
    sent_s: float
    prompt_tokens: int
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    chunk_tokens: list[int] = field(default_factory=list)
    end_s: float | None = None
    error: str = ""  # "" when it completed
    text: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.end_s is not None

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float:
        return (self.chunk_times_s[0] if self.chunk_times_s else self.end_s) - self.sent_s

    @property
    def e2el_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        return (self.e2el_s - self.ttft_s) / (n - 1) if n > 1 else None

    @property
    def itls_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]


def percentile(values: list[float], q: float) -> float:
    """numpy.percentile(values, q) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def std(values: list[float]) -> float:
    if not values:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


@dataclass(frozen=True)
class SLO:
    """Goodput's service-level objectives in ms (None: not checked), as `--goodput ttft:200 tpot:50`."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @staticmethod
    def parse(items: list[str] | None) -> SLO | None:
        if not items:
            return None
        values = {}
        for item in items:
            name, _, number = item.partition(":")
            if name not in ("ttft", "tpot", "e2el") or not number:
                raise ValueError(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
            try:
                values[f"{name}_ms"] = float(number)
            except ValueError:
                raise ValueError(f"--goodput {item!r}: {number!r} is not a number of milliseconds") from None
            if values[f"{name}_ms"] <= 0:
                raise ValueError(f"--goodput {item!r}: the objective must be > 0 ms")
        return SLO(**values)

    def met(self, r: RequestTimeline) -> bool:
        tpot = r.tpot_s if r.tpot_s is not None else 0.0
        return ((self.ttft_ms is None or r.ttft_s * 1e3 <= self.ttft_ms)
                and (self.tpot_ms is None or tpot * 1e3 <= self.tpot_ms)
                and (self.e2el_ms is None or r.e2el_s * 1e3 <= self.e2el_ms))  # fmt: skip


def summarize(
    timelines: list[RequestTimeline],
    duration_s: float,
    percentiles: tuple[float, ...] = (50, 90, 99),
    slo: SLO | None = None,
) -> dict:
    """-> vLLM's result fields: counts, throughputs, and mean/median/std/p<q> of each metric in ms."""
    done = [r for r in timelines if r.ok]
    values = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
        "itl": [gap for r in done for gap in r.itls_s],
        "e2el": [r.e2el_s for r in done],
    }
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    chunks = sum(len(r.chunk_tokens) for r in done)
    result = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(timelines) - len(done),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration_s if duration_s > 0 else math.nan,
        "request_goodput": (sum(slo.met(r) for r in done) / duration_s if duration_s > 0 else math.nan) if slo else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else math.nan,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else math.nan,
        # tokens per streamed chunk: with MTP, 1 + accepted drafts per step (the acceptance length)
        "mean_tokens_per_chunk": out_tokens / chunks if chunks else math.nan,
    }
    for name in METRICS:
        ms = [v * 1e3 for v in values[name]]
        result[f"mean_{name}_ms"] = mean(ms)
        result[f"median_{name}_ms"] = percentile(ms, 50)
        result[f"std_{name}_ms"] = std(ms)
        for q in percentiles:
            result[f"p{_q_word(q)}_{name}_ms"] = percentile(ms, q)
    return result


def _q_word(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else str(q)
