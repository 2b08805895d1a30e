"""Line charts and empirical CDFs written as PNG files, with the standard library only.

    from glm5c.bench.plots import cdf_chart, line_chart
    line_chart("tps.png", [("glm5c", [1, 4, 16], [30.0, 95.0, 210.0])], title="Decode throughput",
               x_label="concurrency", y_label="tokens/s", x_log=True)
    cdf_chart("ttft.png", [("glm5c", ttfts_ms)], title="Time to first token", x_label="TTFT (ms)")

A chart is rasterised into an RGB byte buffer (a built-in 5x7 bitmap font for text, Bresenham
lines two pixels thick, no anti-aliasing) and written by `write_png` with zlib. Axes carry 4-6
ticks at multiples of a 1/2/5 x 10^k step (powers of 2 or 10 on a log x axis). Values that are
not finite are skipped, and so are non-positive x on a log axis; a chart without any point left
draws its axes and "no data". The y axis label is written horizontally above the plot area.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
GRID: RGB = (225, 225, 225)
GREY: RGB = (120, 120, 120)
INSET = 8  # pixels between the plot frame and the ends of the axis ranges
PALETTE: list[RGB] = [
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127),
]  # fmt: skip

# 5x7 glyphs: seven rows, top first, each two hex digits of five bits (0x10 = leftmost column);
# g j p q y have two more rows below, their descenders.
_FONT: dict[str, str] = {
    " ": "00000000000000", ".": "00000000000C0C", ",": "000000000C0408", "-": "0000001F000000", "+": "0004041F040400",
    "%": "18190204081303", "/": "00010204081000", "(": "02040808080402", ")": "08040202020408", ":": "000C0C000C0C00",
    "_": "0000000000001F", "=": "00001F001F0000", "<": "02040810080402", ">": "08040201020408", "!": "04040404040004",
    "?": "0E110102040004", "'": "04040800000000", "[": "0E08080808080E", "]": "0E02020202020E", "*": "0004150E150400",
    "#": "0A0A1F0A1F0A0A", "^": "040A1100000000", "|": "04040404040404",
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F", "3": "1F02040201110E", "4": "02060A121F0202",
    "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E1111111F1111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C", "E": "1F10101E10101F",
    "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111", "I": "0E04040404040E", "J": "0702020202120C",
    "K": "11121418141211", "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E",
    "P": "1E11111E101010", "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111", "Y": "1111110A040404",
    "Z": "1F01020408101F",
    "a": "00000E010F110F", "b": "1010161911111E", "c": "00000E1010110E", "d": "01010D1311110F", "e": "00000E111F100E",
    "f": "0609081C080808", "g": "00000F1111110F010E", "h": "10101619111111", "i": "04000C0404040E", "j": "02000602020202120C",
    "k": "10101214181412", "l": "0C04040404040E", "m": "00001A15151111", "n": "00001619111111", "o": "00000E1111110E",
    "p": "00001E1111111E1010", "q": "00000F1111110F0101", "r": "00001619101010", "s": "00000E100E011E", "t": "08081C08080906",
    "u": "0000111111130D", "v": "00001111110A04", "w": "0000111115150A", "x": "0000110A040A11", "y": "0000111111110F010E",
    "z": "00001F0204081F",
}  # fmt: skip
_BOX = "001F1111111F00"  # drawn for characters the font lacks


def write_png(path: str | os.PathLike, pixels: bytearray, width: int, height: int) -> None:
    """RGB8 pixels (3 bytes a pixel, row-major, top row first) -> a PNG file: signature, IHDR,
    one zlib-compressed IDAT (filter byte 0 before each row) and IEND."""
    if width <= 0 or height <= 0 or len(pixels) != 3 * width * height:
        raise ValueError(f"{len(pixels)} bytes are not {width}x{height} RGB8 pixels")
    stride = 3 * width
    raw = b"".join(b"\x00" + bytes(pixels[r * stride : (r + 1) * stride]) for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


def text_width(s: str, scale: int = 1) -> int:
    return max(0, 6 * len(s) - 1) * scale


class Canvas:
    """An RGB8 image with clipped drawing primitives; coordinates are pixels, y downwards."""

    def __init__(self, width: int, height: int, background: RGB = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def get(self, x: int, y: int) -> RGB:
        i = 3 * (y * self.width + x)
        return (self.pixels[i], self.pixels[i + 1], self.pixels[i + 2])

    def fill(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        """The rectangle x0..x1 by y0..y1, both ends included."""
        x0, x1 = max(0, min(x0, x1)), min(self.width - 1, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height - 1, max(y0, y1))
        if x0 > x1:
            return
        row = bytes(colour) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            i = 3 * (y * self.width + x0)
            self.pixels[i : i + len(row)] = row

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        """The outline of a rectangle, one pixel wide."""
        for xa, ya, xb, yb in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
            self.fill(xa, ya, xb, yb, colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: RGB, thick: int = 2) -> None:
        """Bresenham's line, each point a thick x thick square."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.fill(x0, y0, x0 + thick - 1, y0 + thick - 1, colour)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, colour: RGB, scale: int = 1) -> None:
        """s with its top-left corner at (x, y); each glyph is 5x7 pixels times scale, 1 apart."""
        for ch in s:
            glyph = _FONT.get(ch, _BOX)
            for r in range(len(glyph) // 2):
                bits = int(glyph[2 * r : 2 * r + 2], 16)
                for c in range(5):
                    if bits & (0x10 >> c):
                        px, py = x + c * scale, y + r * scale
                        self.fill(px, py, px + scale - 1, py + scale - 1, colour)
            x += 6 * scale


def _finite(v: float) -> bool:
    """Whether v is a number an axis can show (finite, and not so huge that spans overflow)."""
    try:
        return abs(float(v)) < 1e300  # False for NaN and +-inf
    except (TypeError, ValueError):
        return False


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """lo..hi widened around its middle when it is (nearly) a single value."""
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _padded_log(lo: float, hi: float) -> tuple[float, float]:
    """lo..hi (0 < lo <= hi) widened to an octave either side when it is a single value."""
    return (lo / 2, hi * 2) if hi <= lo * (1 + 1e-9) else (lo, hi)


def _label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or step < 1e-4:  # scientific, with as many digits as the step needs
        digits = max(1, math.floor(math.log10(abs(v))) - math.floor(math.log10(step) + 1e-9) + 1)
        mantissa, _, exponent = f"{v:.{digits - 1}e}".partition("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def nice_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """An axis range covering lo..hi (lo < hi) and 4-6 ticks on it, at multiples of a step of
    1, 2 or 5 x 10^k. The range is widened to the ticks around the data where that gives 4-6."""
    k = math.floor(math.log10(hi - lo)) - 2
    steps = [m * 10.0**e for e in range(k, k + 5) for m in (1, 2, 5)]
    for s in steps:
        a, b = math.floor(lo / s + 1e-9), math.ceil(hi / s - 1e-9)
        if 4 <= b - a + 1 <= 6:
            return a * s, b * s, [i * s for i in range(a, b + 1)]
    for s in steps:  # ticks inside the data range
        a, b = math.ceil(lo / s - 1e-9), math.floor(hi / s + 1e-9)
        if 4 <= b - a + 1 <= 6:
            return lo, hi, [i * s for i in range(a, b + 1)]
    s = next(s for s in steps if math.ceil(hi / s) - math.floor(lo / s) + 1 <= 6)
    a, b = math.floor(lo / s), math.ceil(hi / s)
    return a * s, b * s, [i * s for i in range(a, b + 1)]


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[tuple[float, str]]]:
    """For a log10 axis over lo..hi (0 < lo < hi): the range in log10 units and up to 6 ticks
    (log10 position, label) at powers of 10 (3 decades or more) or else of 2."""
    base = 10.0 if hi / lo >= 1000 else 2.0
    e0 = math.floor(math.log(lo, base) + 1e-9)
    e1 = max(e0 + 1, math.ceil(math.log(hi, base) - 1e-9))
    stride = 1
    while math.ceil(e1 / stride) - math.floor(e0 / stride) + 1 > 6:
        stride += 1
    exps = range(math.floor(e0 / stride) * stride, math.ceil(e1 / stride) * stride + 1, stride)
    plain = all(1e-3 <= base**e < 1e6 for e in exps)  # else every label is 1eN or 2^N
    ticks = []
    for e in exps:
        v = base**e
        label = (str(int(v)) if v == int(v) else f"{v:g}") if plain else (f"1e{e}" if base == 10 else f"2^{e}")
        ticks.append((e * math.log10(base), label))
    return ticks[0][0], ticks[-1][0], ticks


def _chart(path: str | os.PathLike, lines: list[tuple[str, list[tuple[float, float]]]], *, title: str,
           x_label: str, y_label: str, width: int, height: int, x_log: bool, markers: bool,
           y_fixed: tuple[float, float] | None = None) -> None:  # fmt: skip
    """Draw lines (name, points already cleaned of values the axes cannot show) and write the PNG."""
    xs = [x for _, pts in lines for x, _ in pts]
    ys = [y for _, pts in lines for _, y in pts]
    if x_log:
        x_lo, x_hi, x_ticks = log_ticks(*_padded_log(min(xs, default=1.0), max(xs, default=10.0)))
    else:
        x_lo, x_hi, ticks = nice_ticks(*_padded(min(xs, default=0.0), max(xs, default=1.0)))
        x_ticks = [(t, _label(t, ticks[1] - ticks[0])) for t in ticks]
    y_lo, y_hi, ticks = nice_ticks(*(y_fixed or _padded(min(ys, default=0.0), max(ys, default=1.0))))
    y_ticks = [(t, _label(t, ticks[1] - ticks[0])) for t in ticks]

    cv = Canvas(width, height)
    frame_l = 14 + max(text_width(s) for _, s in y_ticks)
    frame_r = max(frame_l + 20, width - 12 - text_width(x_ticks[-1][1]) // 2)
    frame_t, frame_b = 44, max(64, height - 40)
    left, right, top, bottom = frame_l + INSET, frame_r - INSET, frame_t + INSET, frame_b - INSET

    def px(x: float) -> int:
        return round(left + ((math.log10(x) if x_log else x) - x_lo) / (x_hi - x_lo) * (right - left))

    def py(y: float) -> int:
        return round(bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for t, s in x_ticks:
        x = round(left + (t - x_lo) / (x_hi - x_lo) * (right - left))
        cv.fill(x, frame_t, x, frame_b, GRID)
        cv.fill(x, frame_b, x, frame_b + 4, BLACK)
        cv.text(x - text_width(s) // 2, frame_b + 8, s, BLACK)
    for t, s in y_ticks:
        y = py(t)
        cv.fill(frame_l, y, frame_r, y, GRID)
        cv.fill(frame_l - 4, y, frame_l, y, BLACK)
        cv.text(frame_l - 7 - text_width(s), y - 3, s, BLACK)
    scale = 2 if text_width(title, 2) <= width - 16 else 1
    cv.text((width - text_width(title, scale)) // 2, 8, title, BLACK, scale)
    cv.text((frame_l + frame_r - text_width(x_label)) // 2, frame_b + 24, x_label, BLACK)
    cv.text(8, 30, y_label, BLACK)

    for i, (_, pts) in enumerate(lines):
        colour = PALETTE[i % len(PALETTE)]
        points = [(px(x), py(y)) for x, y in pts]
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            cv.line(xa, ya, xb, yb, colour)
        for x, y in points if markers or len(points) == 1 else ():
            cv.fill(x - 2, y - 2, x + 3, y + 3, colour)
    if not xs:
        cv.text((frame_l + frame_r - text_width("no data", 2)) // 2, (frame_t + frame_b) // 2 - 7, "no data", GREY, 2)
    cv.rect(frame_l, frame_t, frame_r, frame_b, BLACK)
    if lines:
        _legend(cv, [name for name, _ in lines], markers, (frame_l, frame_t, frame_r, frame_b))
    write_png(path, cv.pixels, width, height)


def _legend(cv: Canvas, names: list[str], markers: bool, box: tuple[int, int, int, int]) -> None:
    """A framed list of the names beside their colours, in the corner of the plot area that
    covers the fewest drawn data pixels."""
    left, top, right, bottom = box
    w, h = 34 + max(text_width(n) for n in names), 6 + 12 * len(names)
    corners = [(right - 6 - w, top + 6), (left + 6, top + 6), (right - 6 - w, bottom - 6 - h), (left + 6, bottom - 6 - h)]

    def covered(x0: int, y0: int) -> int:
        return sum(cv.get(x, y) not in (WHITE, GRID, BLACK)
                   for y in range(max(0, y0), min(cv.height, y0 + h + 1))
                   for x in range(max(0, x0), min(cv.width, x0 + w + 1)))  # fmt: skip

    x0, y0 = min(corners, key=lambda c: covered(*c))
    cv.fill(x0, y0, x0 + w, y0 + h, WHITE)
    cv.rect(x0, y0, x0 + w, y0 + h, GREY)
    for i, name in enumerate(names):
        colour, y = PALETTE[i % len(PALETTE)], y0 + 6 + 12 * i
        cv.line(x0 + 6, y + 3, x0 + 22, y + 3, colour)
        if markers:
            cv.fill(x0 + 12, y + 1, x0 + 17, y + 6, colour)
        cv.text(x0 + 28, y, name, BLACK)


def line_chart(path: str | os.PathLike, series: list[tuple[str, list[float], list[float]]], *, title: str,
               x_label: str, y_label: str, width: int = 640, height: int = 420, x_log: bool = False) -> None:  # fmt: skip
    """Write a PNG line chart: each series (name, xs, ys) is a polyline with a marker at each
    point, in its own colour, listed in a legend. x_log=True puts x on a log10 axis."""
    lines = []
    for name, xs, ys in series:
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if _finite(x) and _finite(y) and (x > 0 or not x_log)]
        lines.append((str(name), pts))
    _chart(path, lines, title=title, x_label=x_label, y_label=y_label, width=width, height=height,
           x_log=x_log, markers=True)  # fmt: skip


def cdf_chart(path: str | os.PathLike, series: list[tuple[str, list[float]]], *, title: str, x_label: str,
              width: int = 640, height: int = 420) -> None:  # fmt: skip
    """Write a PNG of empirical CDFs: for each (name, values) a step line through the sorted
    values, the fraction of values <= x rising from 0 to 1."""
    lines = []
    for name, values in series:
        vs = sorted(float(v) for v in values if _finite(v))
        pts = [(v, (i + j) / len(vs)) for i, v in enumerate(vs) for j in (0, 1)]
        lines.append((str(name), pts))
    _chart(path, lines, title=title, x_label=x_label, y_label="fraction of requests", width=width,
           height=height, x_log=False, markers=False, y_fixed=(0.0, 1.0))  # fmt: skip
