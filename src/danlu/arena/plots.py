"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from danlu.arena.summary import Row

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = (None, "o", "s", "^", "D", "v", "P", "X")
#: Ten colours that stay apart from each other (matplotlib's tab10).
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def style_for(index: int) -> dict[str, Any]:
    """A colour, line style and marker for the ``index``-th optimizer, the same in every figure.

    Colour cycles through 10, line style through 4 (together: 20 distinct pairs),
    and every further 20 series add a marker, so no two of the first 160 look alike.
    """
    marker = _MARKERS[(index // 20) % len(_MARKERS)]
    style: dict[str, Any] = {"color": _PALETTE[index % 10], "linestyle": _LINESTYLES[index % 4]}
    if marker is not None:
        style.update(marker=marker, markevery=0.1, markersize=4)
    return style


def _label(row: Row) -> str:
    return f"{row.spec}{' (EMA weights)' if row.ema else ''} (lr {row.lr:.3g})"


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


def _band(ax: Any, x: np.ndarray, ys: np.ndarray, label: str, style: dict[str, Any], width: float = 1.6) -> None:
    """Mean line with a min-max band over seeds."""
    mean, low, high = (_nan_reduce(f, ys) for f in (np.nanmean, np.nanmin, np.nanmax))
    ax.plot(x, mean, label=label, linewidth=width, **style)
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


def curves_figure(rows: Sequence[Row], axis: str, metric_label: str, styles: dict[str, int]) -> bytes:
    """Training loss, validation metric, and the metric zoomed to the band of the top runs, against ``axis``.

    Runs evaluated with EMA weights are drawn thicker and say so in the legend.
    """
    plt = _pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    positive = True
    for row in rows:
        style = dict(style_for(styles[row.spec]))
        width = 2.6 if row.ema else 1.6
        for ax, which in ((left, "loss"), (middle, "metric"), (right, "metric")):
            data = _curve(row, which, axis)
            if data is not None:
                _band(ax, data[0], data[1], _label(row), style, width)
                positive = positive and (which != "loss" or bool(np.all(data[1][np.isfinite(data[1])] > 0)))
    xlabel = "step" if axis == "step" else "training time (s, evaluation excluded)"
    left.set(title="training loss (smoothed; mean over seeds, band: min-max)", xlabel=xlabel, ylabel="loss",
             yscale="log" if positive else "linear")
    middle.set(title=f"validation {metric_label}", xlabel=xlabel, ylabel=metric_label)
    band = zoom_band(rows)
    if band is not None:
        right.set_ylim(*band)
    right.set(title=f"validation {metric_label}, zoomed to the top runs", xlabel=xlabel, ylabel=metric_label)
    for ax in (left, middle, right):
        ax.grid(True, alpha=0.3)
    _legend(fig, left)
    return _png(fig)


def zoom_band(rows: Sequence[Row], top: int = 5) -> tuple[float, float] | None:
    """The metric range that holds the last-quarter curves of the ``top`` best rows (by final mean), padded."""
    ranked = [row for row in rows if row.runs and math.isfinite(row.metric_mean)][:top]
    values = []
    for row in ranked:
        for run in row.runs:
            metric = [v for v in run.evals.metric if v is not None and math.isfinite(v)]
            values += metric[len(metric) * 3 // 4:]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = max(0.15 * (high - low), 1e-3 * max(1.0, abs(high)))
    return low - pad, high + pad


def intervals_figure(rows: Sequence[Row], metric: str, styles: dict[str, int], pick: str | None,
                     tied: set[str]) -> bytes:
    """Each optimizer's mean primary metric with its 95% interval over seeds: pick and tied filled, others hollow."""
    plt = _pyplot()
    shown = [row for row in rows if math.isfinite(row.metric_mean)]
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.34 * max(1, len(shown))))
    for position, row in enumerate(reversed(shown)):
        interval = row.metric_interval
        colour = style_for(styles[row.spec])["color"]
        filled = row.spec == pick or row.spec in tied
        if math.isfinite(interval.low):
            ax.plot([interval.low, interval.high], [position, position], color=colour, linewidth=2.2)
        ax.plot([interval.mean], [position], "o", markersize=9 if row.spec == pick else 7, color=colour,
                markerfacecolor=colour if filled else "white", markeredgewidth=1.8)
    labels = [f"{row.spec}{' (EMA weights)' if row.ema else ''}"
              f"{'  ← pick' if row.spec == pick else '  (tied)' if row.spec in tied else ''}"
              for row in reversed(shown)]
    ax.set_yticks(range(len(shown)), labels)
    ax.set(xlabel=f"{metric}: mean over seeds with 95% interval",
           title="filled: the pick and the optimizers tied with it (paired t-test over seeds, 95%)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _legend(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(labels) / 4)), frameon=False)
    fig.tight_layout()


def sensitivity_figure(rows: Sequence[Row], metric_label: str, styles: dict[str, int]) -> bytes:
    """Final validation metric against lr for every optimizer.

    The chosen lr is ringed; a diverged run is an x at the bottom; a run stuck at
    chance is a downward triangle at its value; lrs added by the grid's extension
    are squares.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.6))
    finite = [p.val_metric for row in rows for p in row.sweep if math.isfinite(p.val_metric) and not p.diverged]
    floor = min(finite) if finite else 0.0
    for row in rows:
        if not row.sweep:
            continue
        style = {k: v for k, v in style_for(styles[row.spec]).items() if k in ("color", "linestyle")}
        colour = style["color"]
        lrs = [p.lr for p in row.sweep]
        values = [p.val_metric if not p.diverged and math.isfinite(p.val_metric) else np.nan for p in row.sweep]
        ax.plot(lrs, values, marker="o", markersize=4, label=row.spec, **style)
        _marks(ax, [(p.lr, floor) for p in row.sweep if p.diverged or not math.isfinite(p.val_metric)], "x", colour)
        _marks(ax, [(p.lr, p.val_metric) for p in row.sweep if p.stuck], "v", colour)
        _marks(ax, [(p.lr, p.val_metric) for p in row.sweep if p.extended and p.usable], "s", colour)
        chosen = [p for p in row.sweep if p.lr == row.lr]
        if chosen and math.isfinite(chosen[0].val_metric):
            ax.plot([row.lr], [chosen[0].val_metric], "o", markersize=11, markerfacecolor="none",
                    markeredgecolor=colour, markeredgewidth=1.6)
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"validation {metric_label} after the full budget (seed 0)",
           title="learning-rate sensitivity (ring: chosen; x: diverged; ▼: stuck at chance; ■: grid extension)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    return _png(fig)


def _marks(ax: Any, points: Sequence[tuple[float, float]], marker: str, colour: Any) -> None:
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], marker, color=colour, markersize=8,
                markerfacecolor="none" if marker == "s" else colour, linestyle="none")
