"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from danlu.arena.summary import Row

_STYLES = ("-", "--", ":", "-.")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def style_for(index: int) -> dict[str, Any]:
    """A colour and line style for the ``index``-th optimizer, the same in every figure."""
    plt = _pyplot()
    colours = plt.get_cmap("tab10").colors
    return {"color": colours[index % 10], "linestyle": _STYLES[(index // 10) % len(_STYLES)]}


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _stack(curves: Sequence[tuple[list[float], list[float]]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Align curves on the longest x axis (runs that stopped early are padded with NaN)."""
    curves = [(x, y) for x, y in curves if x]
    if not curves:
        return None
    longest = max(curves, key=lambda c: len(c[0]))[0]
    ys = np.full((len(curves), len(longest)), np.nan)
    for i, (_, y) in enumerate(curves):
        values = np.array([np.nan if v is None else v for v in y], dtype=float)
        ys[i, : len(values)] = values
    return np.asarray(longest, dtype=float), ys


def _nan_reduce(function: Any, values: np.ndarray) -> np.ndarray:
    """``function(values, axis=0)`` without warnings for all-NaN columns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return function(values, 0)


def _band(ax: Any, x: np.ndarray, ys: np.ndarray, label: str, style: dict[str, Any]) -> None:
    """Mean line with a min-max band over seeds."""
    mean, low, high = (_nan_reduce(f, ys) for f in (np.nanmean, np.nanmin, np.nanmax))
    ax.plot(x, mean, label=label, linewidth=1.6, **style)
    if ys.shape[0] > 1:
        ax.fill_between(x, low, high, color=style["color"], alpha=0.12, linewidth=0)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (fewer at the start); a NaN stays NaN."""
    array = np.asarray(values, dtype=float)
    if window <= 1 or len(array) == 0:
        return array.tolist()
    sums = np.cumsum(np.insert(np.nan_to_num(array, nan=0.0), 0, 0.0))
    index = np.arange(1, len(array) + 1)
    start = np.maximum(0, index - window)
    out = (sums[index] - sums[start]) / (index - start)
    out[~np.isfinite(array)] = np.nan
    return out.tolist()


def _curve(row: Row, which: str, axis: str) -> tuple[np.ndarray, np.ndarray] | None:
    curves = []
    for run in row.runs:
        curve = run.train if which == "loss" else run.evals
        values = curve.loss if which == "loss" else curve.metric
        if which == "loss":
            values = smooth(values, max(1, len(values) // 25))
        x = curve.step if axis == "step" else curve.time
        curves.append((list(x), list(values)))
    stacked = _stack(curves)
    if stacked is None or axis == "step":
        return stacked
    times = np.array([np.pad(np.asarray(run_x, dtype=float), (0, len(stacked[0]) - len(run_x)),
                             constant_values=np.nan) for run_x, _ in curves if run_x])
    return _nan_reduce(np.nanmean, times), stacked[1]


def curves_figure(rows: Sequence[Row], axis: str, metric_label: str, colours: dict[str, int]) -> bytes:
    """Training loss and validation metric against ``axis`` ("step" or "time"), mean over seeds."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    positive = True
    for row in rows:
        style = style_for(colours[row.spec])
        for ax, which in ((left, "loss"), (right, "metric")):
            data = _curve(row, which, axis)
            if data is not None:
                _band(ax, data[0], data[1], f"{row.spec} (lr {row.lr:.3g})", style)
                positive = positive and (which != "loss" or bool(np.all(data[1][np.isfinite(data[1])] > 0)))
    xlabel = "step" if axis == "step" else "training time (s, evaluation excluded)"
    left.set(title="training loss (smoothed; mean over seeds, band: min-max)", xlabel=xlabel, ylabel="loss",
             yscale="log" if positive else "linear")
    right.set(title=f"validation {metric_label}", xlabel=xlabel, ylabel=metric_label)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    _legend(fig, left)
    return _png(fig)


def _legend(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(labels) / 4)), frameon=False)
    fig.tight_layout()


def sensitivity_figure(rows: Sequence[Row], metric_label: str, colours: dict[str, int]) -> bytes:
    """Final validation metric against lr for every optimizer; the chosen lr is ringed, diverged runs are x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.6))
    finite = [p.val_metric for row in rows for p in row.sweep if math.isfinite(p.val_metric) and not p.diverged]
    floor = min(finite) if finite else 0.0
    for row in rows:
        if not row.sweep:
            continue
        style = style_for(colours[row.spec])
        lrs = [p.lr for p in row.sweep]
        values = [p.val_metric if not p.diverged and math.isfinite(p.val_metric) else np.nan for p in row.sweep]
        ax.plot(lrs, values, marker="o", markersize=4, label=row.spec, **style)
        bad = [p.lr for p in row.sweep if p.diverged or not math.isfinite(p.val_metric)]
        if bad:
            ax.plot(bad, [floor] * len(bad), "x", color=style["color"], markersize=8)
        if row.lr is not None:
            chosen = [p for p in row.sweep if p.lr == row.lr]
            if chosen and math.isfinite(chosen[0].val_metric):
                ax.plot([row.lr], [chosen[0].val_metric], "o", markersize=11, markerfacecolor="none",
                        markeredgecolor=style["color"], markeredgewidth=1.6)
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"validation {metric_label} after the full budget (seed 0)",
           title="learning-rate sensitivity (ring: chosen lr; x: diverged)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    return _png(fig)
