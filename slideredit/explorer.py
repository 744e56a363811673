"""The sweep explorer: one self-contained offline HTML page per sweep folder, to drag the sliders.

`write_explorer(folder)` writes folder/index.html next to sweep.json (format: evaluation/sweep.py). The
page needs no server and no network: plain HTML, a little JS, the sweep's record embedded as JSON, and
the images by relative path, so the folder can be zipped, copied or opened with file://. It shows the
source image and the cell of the current alphas, with one range slider per adapter slider that snaps to
the swept alphas. Keys: Left/Right move the active slider one swept alpha, Up/Down choose the active
slider. The URL fragment holds the alphas (index.html#alphas=0.5,-1 opens that cell; the page keeps it
up to date, so a link shows the same cell). When the sweep does not hold every combination (eval.py's
model mode sweeps each slider alone), moving a slider picks the swept cell nearest the other sliders.
`scores`, e.g. eval.py's, are shown for the current cell. A local model is named by its folder name
only: the page is made to be shared, and a path of this machine means nothing elsewhere.
"""
from __future__ import annotations

import json
import math
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from .atomic import atomic_path
from .evaluation.sweep import Sweep, read_sweep

EXPLORER_FILE = "index.html"

# cell image (as in sweep.json, relative to the folder) -> {score name: value}
Scores = Mapping[str, Mapping[str, float | None]]


def slider_labels(sweep: Sweep) -> list[str]:
    """What each slider controls: its sub-prompt (STLoRA), the prompt (GSTLoRA), else just alpha."""
    if sweep.method == "stlora":
        return list(sweep.subprompts)
    return [sweep.prompt] if sweep.method == "gstlora" else ["alpha"]


def model_label(model: str) -> str:
    """The model as the page names it: a local folder (absolute, or ./ or ../ as sweep.json records one) by
    its name only, a hub id as it is."""
    return Path(model).name if Path(model).is_absolute() or model.startswith(("./", "../")) else model


def page_data(sweep: Sweep, scores: Scores | None = None) -> dict:
    """The JSON the page runs on: per slider its sorted swept alphas; per cell its index into each list."""
    sliders = [sorted({cell.alphas[k] for cell in sweep.cells}) for k in range(sweep.num_sliders)]
    unknown = sorted(set(scores or {}) - {cell.image for cell in sweep.cells})
    if unknown:
        raise ValueError(f"scores name image(s) {unknown[:3]} that are not cells of the sweep")

    def value(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v)

    return {
        "prompt": sweep.prompt, "method": sweep.method, "model": model_label(sweep.model), "seed": sweep.seed,
        "source": urllib.parse.quote(sweep.source_image),
        "sliders": [{"label": label, "alphas": alphas} for label, alphas in zip(slider_labels(sweep), sliders)],
        "cells": [{"index": [sliders[k].index(a) for k, a in enumerate(cell.alphas)], "alphas": list(cell.alphas),
                   "image": urllib.parse.quote(cell.image), "name": cell.image,
                   "scores": {name: value(v) for name, v in (scores or {}).get(cell.image, {}).items()}}
                  for cell in sweep.cells],
    }


def write_explorer(sweep_folder: str | os.PathLike, scores: Scores | None = None) -> Path:
    """Write sweep_folder/index.html for the sweep recorded in its sweep.json; return its path.

    `scores` maps a cell's image path, as sweep.json names it, to the scores to show with that cell.
    """
    folder = Path(sweep_folder)
    sweep = read_sweep(folder)
    text = json.dumps(page_data(sweep, scores), ensure_ascii=True).replace("</", "<\\/")  # no </script> inside
    html = PAGE.replace("__SWEEP_DATA__", text)
    with atomic_path(folder / EXPLORER_FILE) as temp:
        temp.write_text(html, encoding="utf-8")
    return folder / EXPLORER_FILE


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SliderEdit sweep</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  .meta { color: #666; font-size: 13px; margin-bottom: 12px; }
  .images { display: flex; gap: 16px; align-items: flex-start; }
  figure { margin: 0; }
  figure img { width: 320px; max-width: 44vw; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
  figcaption { font-size: 13px; color: #444; margin-top: 4px; }
  .slider { margin: 10px 0; padding: 6px 8px; border-left: 4px solid transparent; }
  .slider.active { border-left-color: #1f77b4; background: #f2f7fc; }
  .slider label { display: block; font-size: 14px; }
  .slider input { width: 420px; max-width: 90vw; }
  .ticks { font-size: 12px; color: #666; }
  table { border-collapse: collapse; font-size: 13px; margin-top: 12px; }
  td { padding: 2px 10px 2px 0; }
  .missing { color: #b00; font-size: 13px; }
</style>
</head>
<body>
<h1 id="prompt"></h1>
<div class="meta" id="meta"></div>
<div id="sliders"></div>
<div class="images">
  <figure><img id="source" alt="source image"><figcaption>source</figcaption></figure>
  <figure><img id="cell" alt="edited image"><figcaption id="caption"></figcaption></figure>
</div>
<table id="scores"></table>
<div class="meta">Keys: Left / Right move the active slider, Up / Down choose it.</div>
<script type="application/json" id="sweep-data">__SWEEP_DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("sweep-data").textContent);
const byIndex = new Map(data.cells.map(cell => [cell.index.join(","), cell]));
const state = { index: data.cells[0].index.slice(), active: 0 };
const inputs = [];
const fmt = a => (a > 0 ? "+" : "") + a.toFixed(2);

// Start at the base edit (every alpha 0) when it was swept.
const zero = data.cells.find(cell => cell.alphas.every(a => a === 0));
if (zero) state.index = zero.index.slice();

// The swept cell with slider k at position i, nearest the current positions of the other sliders.
function nearest(k, i) {
  let best = null, bestDistance = Infinity;
  for (const cell of data.cells) {
    if (cell.index[k] !== i) continue;
    const d = cell.index.reduce((sum, j, n) => sum + Math.abs(j - state.index[n]), 0);
    if (d < bestDistance) { best = cell; bestDistance = d; }
  }
  return best;
}

function show() {
  const cell = byIndex.get(state.index.join(","));
  document.getElementById("cell").src = cell.image;
  document.getElementById("caption").textContent =
    "alpha " + cell.alphas.map(fmt).join(", ") + "  (" + cell.name + ")";
  inputs.forEach((input, k) => {
    input.value = String(state.index[k]);
    document.getElementById("value-" + k).textContent = fmt(data.sliders[k].alphas[state.index[k]]);
    input.parentElement.classList.toggle("active", k === state.active);
  });
  const table = document.getElementById("scores");
  table.replaceChildren();
  for (const [name, value] of Object.entries(cell.scores)) {
    const row = table.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = value === null ? "n/a" : value.toFixed(4);
  }
  history.replaceState(null, "", "#alphas=" + cell.alphas.join(","));
}

function move(k, i) {
  i = Math.max(0, Math.min(data.sliders[k].alphas.length - 1, i));
  state.active = k;
  const cell = nearest(k, i);
  if (cell) state.index = cell.index.slice();
  show();
}

// #alphas=a,b: each slider at its swept alpha nearest a, b; then the nearest swept cell.
function fromHash() {
  const match = /alphas=([^&]*)/.exec(location.hash);
  if (!match) return false;
  const wanted = match[1].split(",").map(Number);
  if (wanted.length !== data.sliders.length || wanted.some(isNaN)) return false;
  const positions = wanted.map((a, k) => {
    const alphas = data.sliders[k].alphas;
    return alphas.reduce((best, b, j) => Math.abs(b - a) < Math.abs(alphas[best] - a) ? j : best, 0);
  });
  state.index = positions;
  if (!byIndex.has(positions.join(","))) {
    let best = data.cells[0], bestDistance = Infinity;
    for (const cell of data.cells) {
      const d = cell.index.reduce((sum, j, n) => sum + Math.abs(j - positions[n]), 0);
      if (d < bestDistance) { best = cell; bestDistance = d; }
    }
    state.index = best.index.slice();
  }
  return true;
}

document.getElementById("prompt").textContent = data.prompt;
document.getElementById("meta").textContent =
  data.method + " sweep, seed " + data.seed + ", model " + data.model + ", " + data.cells.length + " cells";
document.getElementById("source").src = data.source;
data.sliders.forEach((slider, k) => {
  const box = document.createElement("div");
  box.className = "slider";
  const label = document.createElement("label");
  label.htmlFor = "slider-" + k;
  label.textContent = (data.sliders.length > 1 ? "slider " + (k + 1) + ": " : "") + slider.label + " ";
  const value = document.createElement("b");
  value.id = "value-" + k;
  label.appendChild(value);
  const input = document.createElement("input");
  Object.assign(input, { type: "range", id: "slider-" + k, min: "0", max: String(slider.alphas.length - 1), step: "1" });
  input.addEventListener("input", () => move(k, Number(input.value)));
  input.addEventListener("focus", () => { state.active = k; show(); });
  const ticks = document.createElement("div");
  ticks.className = "ticks";
  ticks.textContent = "alphas: " + slider.alphas.map(fmt).join("  ");
  box.append(label, input, ticks);
  document.getElementById("sliders").appendChild(box);
  inputs.push(input);
});
document.addEventListener("keydown", event => {
  const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
  const choose = { ArrowUp: -1, ArrowDown: 1 }[event.key];
  if (step === undefined && choose === undefined) return;
  event.preventDefault();  // a focused range input would move too
  if (step !== undefined) move(state.active, state.index[state.active] + step);
  else {
    state.active = (state.active + choose + inputs.length) % inputs.length;
    show();
  }
});
window.addEventListener("hashchange", () => { if (fromHash()) show(); });
for (const cell of data.cells) new Image().src = cell.image;  // preload: switching cells is instant
fromHash();
show();
</script>
</body>
</html>
"""
