"""Slider-response curves drawn with PIL alone (matplotlib is not a dependency of the project).

One panel per metric (score against alpha, one coloured polyline per case), panels in rows, one
legend below them that maps colours to cases.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

# matplotlib's "tab10" colours: distinct, and readable on white.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

Curve = tuple[Sequence[float], Sequence[float]]  # (alphas, values)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 5) -> list[tuple[float, str]]:
    """`count` evenly spaced ticks with labels rounded to the spacing (-0.50 -> "-0.5", 1.00 -> "1")."""
    step = (high - low) / (count - 1)
    decimals = max(0, 1 - math.floor(math.log10(step)))
    ticks = [low + step * i for i in range(count)]
    labels = [f"{t:.{decimals}f}".rstrip("0").rstrip(".") if decimals else f"{t:.0f}" for t in ticks]
    return [(t, "0" if label in ("-0", "") else label) for t, label in zip(ticks, labels)]


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
                curves: dict[str, Curve], colours: dict[str, str], font: ImageFont.ImageFont) -> None:
    """Axes, ticks, labels and one polyline per curve inside box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    plot_left, plot_top, plot_right, plot_bottom = left + 60, top + 28, right - 12, bottom - 42
    finite = [(a, v) for alphas, values in curves.values() for a, v in zip(alphas, values) if math.isfinite(v)]
    x_low, x_high = (min(a for a, _ in finite), max(a for a, _ in finite)) if finite else (-1.0, 1.0)
    y_low, y_high = (min(v for _, v in finite), max(v for _, v in finite)) if finite else (0.0, 1.0)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    pad = (y_high - y_low) * 0.05 or max(abs(y_low) * 0.05, 0.05)  # a flat curve still gets a visible band
    y_low, y_high = y_low - pad, y_high + pad

    def to_pixel(a: float, v: float) -> tuple[float, float]:
        x = plot_left + (a - x_low) / (x_high - x_low) * (plot_right - plot_left)
        y = plot_bottom - (v - y_low) / (y_high - y_low) * (plot_bottom - plot_top)
        return x, y

    draw.text(((left + right) / 2, top + 6), title, fill="black", font=font, anchor="mt")
    draw.rectangle((plot_left, plot_top, plot_right, plot_bottom), outline="black")
    for a, label in _ticks(x_low, x_high):
        x, _ = to_pixel(a, y_low)
        draw.line((x, plot_bottom, x, plot_bottom + 4), fill="black")
        draw.text((x, plot_bottom + 6), label, fill="black", font=font, anchor="mt")
    for v, label in _ticks(y_low, y_high):
        _, y = to_pixel(x_low, v)
        draw.line((plot_left - 4, y, plot_left, y), fill="black")
        draw.text((plot_left - 6, y), label, fill="black", font=font, anchor="rm")
    draw.text(((plot_left + plot_right) / 2, bottom - 4), "alpha", fill="black", font=font, anchor="mb")

    for name, (alphas, values) in curves.items():
        points = sorted(zip(alphas, values))
        segment: list[tuple[float, float]] = []
        for a, v in points + [(math.nan, math.nan)]:  # a NaN value breaks the line; the sentinel ends it
            if math.isfinite(v):
                segment.append(to_pixel(a, v))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=colours[name], width=2)
            for x, y in segment:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[name])
            segment = []


def draw_curves(panels: dict[str, dict[str, Curve]], panel_size: tuple[int, int] = (420, 300),
                columns: int = 3) -> Image.Image:
    """Draw {panel title: {case: (alphas, values)}}: one panel per title, a shared legend; return the RGB image."""
    if not panels:
        raise ValueError("draw_curves needs at least one panel")
    names = list(dict.fromkeys(case for curves in panels.values() for case in curves))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    font = _font(13)
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    width, height = panel_size
    line_height = 20
    image = Image.new("RGB", (columns * width, rows * height + 10 + line_height * len(names)), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, curves) in enumerate(panels.items()):
        left, top = (index % columns) * width, (index // columns) * height
        _draw_panel(draw, (left, top, left + width, top + height), title, curves, colours, font)
    for index, name in enumerate(names):  # legend: colour swatch and case name, one per line
        y = rows * height + 5 + index * line_height
        draw.line((20, y + line_height / 2, 50, y + line_height / 2), fill=colours[name], width=3)
        draw.text((58, y + line_height / 2), name, fill="black", font=font, anchor="lm")
    return image
