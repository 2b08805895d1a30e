"""bench/plots.py: the PNG files it writes parse back (signature, chunk CRCs, IHDR, one IDAT of
unfiltered RGB8 rows), charts draw their series in distinct colours, and degenerate data
(no series, no points, one point, equal values, NaN/inf, non-positive x on a log axis) does not raise."""

from __future__ import annotations

import math
import struct
import zlib

import pytest

from glm5c.bench.plots import (
    _FONT, PALETTE, WHITE, Canvas, cdf_chart, line_chart, log_ticks, nice_ticks, text_width, write_png,
)  # fmt: skip

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path) -> tuple[int, int, bytes]:
    """(width, height, RGB8 pixels) of a PNG as write_png makes it, checking every part on the way."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert len(body) == length
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert chunks[2][1] == b""
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[r * stride] == 0 for r in range(height)), "every row has filter byte 0 (None)"
    return width, height, b"".join(raw[r * stride + 1 : (r + 1) * stride] for r in range(height))


def colours(pixels: bytes) -> dict[tuple[int, int, int], int]:
    counts: dict[tuple[int, int, int], int] = {}
    for i in range(0, len(pixels), 3):
        c = (pixels[i], pixels[i + 1], pixels[i + 2])
        counts[c] = counts.get(c, 0) + 1
    return counts


def test_write_png_round_trips_a_tiny_image(tmp_path):
    path = tmp_path / "tiny.png"
    write_png(path, bytearray([255, 0, 0, 0, 0, 255]), 2, 1)  # red, blue
    assert read_png(path) == (2, 1, bytes([255, 0, 0, 0, 0, 255]))
    pixels = bytearray((i * 37) % 256 for i in range(3 * 5 * 7))
    write_png(path, pixels, 5, 7)
    assert read_png(path) == (5, 7, bytes(pixels))


def test_write_png_rejects_a_buffer_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError):
        write_png(tmp_path / "x.png", bytearray(5), 2, 1)


def test_line_chart_draws_each_series_in_its_own_colour(tmp_path):
    path = tmp_path / "chart.png"
    series = [("engine", [1, 2, 4, 8, 16], [30.0, 58.0, 110.0, 190.0, 310.0]),
              ("baseline", [1, 2, 4, 8, 16], [20.0, 35.0, 60.0, 90.0, 120.0])]  # fmt: skip
    line_chart(path, series, title="Throughput", x_label="concurrency", y_label="tokens/s")
    width, height, pixels = read_png(path)
    assert (width, height) == (640, 420)
    counts = colours(pixels)
    assert sum(n for c, n in counts.items() if c != WHITE) > 5000
    assert counts.get(PALETTE[0], 0) > 300 and counts.get(PALETTE[1], 0) > 300
    assert (0, 0, 0) in counts  # axes and text


def test_line_chart_log_x_and_size(tmp_path):
    path = tmp_path / "log.png"
    line_chart(path, [("a", [1, 4, 16, 64], [1.0, 2.0, 3.0, 4.0])], title="t", x_label="x", y_label="y",
               width=300, height=200, x_log=True)  # fmt: skip
    width, height, pixels = read_png(path)
    assert (width, height) == (300, 200)
    assert colours(pixels).get(PALETTE[0], 0) > 100


def test_cdf_chart(tmp_path):
    path = tmp_path / "cdf.png"
    fast = [10.0 + (i * 7919) % 100 / 10 for i in range(500)]
    slow = [30.0 + (i * 104729) % 100 / 5 for i in range(300)]
    cdf_chart(path, [("fast", fast), ("slow", slow)], title="TTFT", x_label="ms")
    _, _, pixels = read_png(path)
    counts = colours(pixels)
    assert counts.get(PALETTE[0], 0) > 300 and counts.get(PALETTE[1], 0) > 300


NAN, INF = math.nan, math.inf
EDGE_LINE_SERIES = {
    "no series": [],
    "empty series": [("empty", [], [])],
    "single point": [("one", [3.0], [5.0])],
    "all equal": [("flat", [2.0, 2.0, 2.0], [7.0, 7.0, 7.0])],
    "zeros": [("zero", [0.0, 0.0], [0.0, 0.0])],
    "nan and inf": [("bad", [NAN, 1.0, 2.0, INF, 3.0], [1.0, NAN, 3.0, 4.0, -INF])],
    "only nan": [("nan", [NAN, NAN], [NAN, INF])],
    "mismatched lengths": [("short", [1.0, 2.0, 3.0], [1.0, 2.0])],
    "huge and tiny": [("big", [1e-9, 1e12], [-1e15, 1e15]), ("small", [1e-12, 2e-12], [1e-12, 3e-12])],
    "many series": [(f"s{i}", [0.0, 1.0], [i, i + 1.0]) for i in range(15)],
    "unknown characters": [("µs ∆ ~ & @", [1.0, 2.0], [1.0, 2.0])],
}


@pytest.mark.parametrize("x_log", [False, True])
@pytest.mark.parametrize("case", list(EDGE_LINE_SERIES))
def test_line_chart_edge_cases_do_not_raise(tmp_path, case, x_log):
    path = tmp_path / "edge.png"
    line_chart(path, EDGE_LINE_SERIES[case], title=case, x_label="x", y_label="y", x_log=x_log)
    assert read_png(path)[:2] == (640, 420)


def test_log_axis_skips_non_positive_x(tmp_path):
    path = tmp_path / "log.png"
    line_chart(path, [("neg", [-1.0, 0.0], [1.0, 2.0])], title="t", x_label="x", y_label="y", x_log=True)
    line_chart(path, [("mixed", [-1.0, 0.0, 2.0, 8.0], [1.0, 2.0, 3.0, 4.0])], title="t", x_label="x",
               y_label="y", x_log=True)  # fmt: skip
    assert colours(read_png(path)[2]).get(PALETTE[0], 0) > 50


@pytest.mark.parametrize(
    "series",
    [[], [("empty", [])], [("one", [4.2])], [("equal", [1.0] * 10)], [("nan", [NAN, INF, 3.0, -INF, 1.0])]],
)
def test_cdf_chart_edge_cases_do_not_raise(tmp_path, series):
    path = tmp_path / "cdf.png"
    cdf_chart(path, series, title="cdf", x_label="x", width=320, height=240)
    assert read_png(path)[:2] == (320, 240)


def test_tiny_canvas_does_not_raise(tmp_path):
    path = tmp_path / "small.png"
    line_chart(path, [("a", [1.0, 2.0], [1.0, 2.0])], title="a long title", x_label="x", y_label="y",
               width=40, height=30)  # fmt: skip
    assert read_png(path)[:2] == (40, 30)


def test_no_data_is_written_on_an_empty_chart(tmp_path):
    empty, drawn = tmp_path / "empty.png", tmp_path / "axes.png"
    line_chart(empty, [], title="t", x_label="x", y_label="y")
    cv = Canvas(640, 420)
    cv.text(0, 0, "no data", (120, 120, 120), 2)
    grey = colours(read_png(empty)[2]).get((120, 120, 120), 0)
    assert grey >= colours(bytes(cv.pixels))[(120, 120, 120)]


def test_nice_ticks_are_4_to_6_steps_of_1_2_5():
    ranges = [(0.0, 1.0), (1.0, 64.0), (5.0, 15.0), (-3.0, -1.0), (0.9, 1.1), (1e6, 1.5e6), (1e-7, 3e-7), (0.0, 480.0)]
    ranges += [(i * 0.37 - 20, i * 0.37 - 20 + 10 ** (i % 9 - 4) * (1 + i % 7)) for i in range(300)]
    for lo, hi in ranges:
        axis_lo, axis_hi, ticks = nice_ticks(lo, hi)
        assert 4 <= len(ticks) <= 6, (lo, hi, ticks)
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
        assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6, (lo, hi, step)
        assert all(abs(b - a - step) <= 1e-9 * step for a, b in zip(ticks, ticks[1:]))
        tol = 1e-9 * (hi - lo)
        assert axis_lo <= lo + tol and axis_hi >= hi - tol
        assert axis_lo - tol <= ticks[0] and ticks[-1] <= axis_hi + tol


def test_log_ticks_are_powers_of_2_or_10():
    lo, hi, ticks = log_ticks(1.0, 64.0)
    assert [label for _, label in ticks] == ["1", "4", "16", "64"]
    assert (lo, hi) == (0.0, pytest.approx(math.log10(64)))
    _, _, ticks = log_ticks(0.01, 1e5)
    assert all(p == pytest.approx(round(p)) for p, _ in ticks) and 2 <= len(ticks) <= 6


def test_font_covers_the_required_characters():
    import string

    for ch in string.digits + string.ascii_letters + " .,-+%/():_=<>e":
        glyph = _FONT[ch]
        assert len(glyph) in (14, 18) and all(int(glyph[i : i + 2], 16) < 32 for i in range(0, len(glyph), 2))
    assert len({_FONT[c] for c in string.ascii_letters + string.digits}) == 62, "glyphs are distinct"
    assert text_width("abc") == 17 and text_width("abc", 2) == 34
