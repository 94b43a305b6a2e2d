"""The report folder: a self-contained HTML page, a Markdown summary, raw curves (CSV, JSON), PNGs."""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import danlu
from danlu.arena.records import RunRecord, _finite_or_none
from danlu.arena.summary import Row, fmt_lr, fmt_metric, fmt_number, fmt_steps

if TYPE_CHECKING:  # pragma: no cover - typing only, avoids an import cycle
    from danlu.arena.arena import ArenaConfig

HTML_NAME = "report.html"
MARKDOWN_NAME = "summary.md"
CSV_NAME = "curves.csv"
JSON_NAME = "results.json"


def table(config: ArenaConfig, rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """The results table as header and string cells, shared by the HTML, Markdown and terminal views."""
    task = config.task
    label = task.info().metric_label
    split = "test" if task.has_split("test") else "validation"
    header = ["#", "optimizer", "chosen lr"]
    if task.target is not None:
        header.append(f"steps to {label} ≥ {task.target:g}")
    header += [f"{split} {label} (mean ± sd)", "final train loss", "ms / step", "state bytes / param",
               "seeds", "note"]
    body = []
    for rank, row in enumerate(rows, 1):
        cells = [str(rank), row.spec, fmt_lr(row.lr)]
        if task.target is not None:
            cells.append(fmt_steps(row))
        note = "; ".join(n for n in (row.lr_note, _diverged_note(row)) if n)
        cells += [fmt_metric(row.metric_mean, row.metric_std, len(row.runs)), fmt_number(row.train_loss_mean, 3),
                  fmt_number(row.step_time_ms, 3), fmt_number(row.state_bytes_per_param, 3),
                  f"{len(row.runs)}/{row.seeds_planned}", note]
        body.append(cells)
    return header, body


def _diverged_note(row: Row) -> str:
    return f"{row.diverged} seed(s) diverged" if row.diverged else ""


def sensitivity_table(config: ArenaConfig, rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Validation metric for each optimizer at each multiplier of its typical lr."""
    header = ["optimizer"] + [f"×{m:g}" for m in config.lr_grid]
    body = []
    for row in rows:
        by_lr = {p.lr: p for p in row.sweep}
        cells = [row.spec]
        for lr in config.lrs(row.spec):
            point = by_lr.get(lr)
            if point is None:
                cells.append("—")
                continue
            value = "diverged" if point.diverged else fmt_number(point.val_metric, 4)
            mark = " *" if lr == row.lr else ""
            cells.append(f"{lr:.3g}: {value}{mark}")
        body.append(cells)
    return header, body


def write_report(config: ArenaConfig, rows: Sequence[Row], records: Sequence[RunRecord], *,
                 interrupted: bool = False) -> dict[str, Path]:
    """Write every file of the report into ``config.out`` and return their paths."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(config, rows)
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    files: dict[str, Path] = {}
    for name, data in plots.items():
        path = plot_dir / f"{name}.png"
        path.write_bytes(data)
        files[f"plot:{name}"] = path
    meta = _meta(config, rows, records, interrupted)
    files["html"] = _write(out / HTML_NAME, render_html(config, rows, plots, meta))
    files["markdown"] = _write(out / MARKDOWN_NAME, render_markdown(config, rows, meta))
    files["csv"] = _write_csv(out / CSV_NAME, records)
    files["json"] = _write(out / JSON_NAME, json.dumps(_results_json(config, rows, records, meta), indent=1))
    return files


def _write(path: Path, text: str) -> Path:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def _plots(config: ArenaConfig, rows: Sequence[Row]) -> dict[str, bytes]:
    from danlu.arena.plots import curves_figure, sensitivity_figure

    colours = {spec: i for i, spec in enumerate(config.optimizers)}
    label = config.task.info().metric_label
    shown = [row for row in rows if row.runs]
    return {
        "curves_vs_step": curves_figure(shown, "step", label, colours),
        "curves_vs_time": curves_figure(shown, "time", label, colours),
        "lr_sensitivity": sensitivity_figure(rows, label, colours),
    }


def _meta(config: ArenaConfig, rows: Sequence[Row], records: Sequence[RunRecord], interrupted: bool) -> dict[str, Any]:
    info = config.task.info()
    incomplete = [row.spec for row in rows if not row.complete]
    return {
        "title": info.title, "data": info.data, "model": info.model, "notes": info.notes,
        "metric": config.task.metric, "task": config.task.name,
        "steps": config.steps, "seeds": config.seeds, "eval_every": config.eval_every,
        "lr_grid": list(config.lr_grid), "optimizers": list(config.optimizers),
        "hyperparameters": {spec: {k: str(v) for k, v in config.settings(spec).items()} for spec in config.optimizers},
        "interrupted": interrupted, "incomplete": incomplete,
        "runs": len(records), "train_seconds": round(sum(r.wall_s for r in records), 1),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": f"danlu {danlu.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "threads": torch.get_num_threads() if config.threads is None else config.threads,
    }


def _status_line(meta: dict[str, Any]) -> str:
    if meta["interrupted"]:
        return ("Interrupted: this report shows the runs that finished. Run the same command again "
                "with the same output folder to resume.")
    if meta["incomplete"]:
        return "Incomplete: " + ", ".join(meta["incomplete"]) + " did not finish every run."
    return ""


def _budget_line(meta: dict[str, Any]) -> str:
    grid = ", ".join(f"{m:g}" for m in meta["lr_grid"])
    return (f"{meta['steps']} steps per run, validation every {meta['eval_every']} steps, "
            f"{meta['seeds']} seed(s) at the chosen lr; lr sweep: typical lr × [{grid}] on seed 0")


FAIRNESS = [
    "Every optimizer trains the same model from the same initialisation, on the same batches in the same "
    "order, for the same number of steps (seed by seed).",
    "Each optimizer's learning rate is chosen by the same rule: a log grid around its typical lr, "
    "trained on seed 0, best final validation metric (ties: lower validation loss).",
    "Final numbers are on held-out data over every seed at the chosen lr; the seed-0 run of the sweep is one "
    "of them (it is the same computation).",
    "An EMA optimizer is evaluated with its averaged weights. Time per step is the median wall time of "
    "forward, backward and optimizer step; state bytes per parameter count every tensor in the optimizer state.",
]


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2330;padding:0 16px;background:#fff}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;margin-top:32px;border-bottom:1px solid #dde;padding-bottom:4px}
p.meta{color:#4a5266;margin:2px 0;font-size:14px}
table{border-collapse:collapse;font-size:14px;margin:12px 0}
th,td{border:1px solid #d7dbe6;padding:5px 9px;text-align:left}
th{background:#eef1f8}tr:nth-child(even) td{background:#f8f9fc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff4d6;border:1px solid #e6c46a;padding:10px 14px;margin:14px 0}
img{max-width:100%;border:1px solid #e3e6ee;margin:8px 0}
li{margin:4px 0}code{background:#f1f2f6;padding:1px 4px}
"""


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for cells in body:
        tds = "".join(f'<td class="{"num" if _numeric(c) else "txt"}">{html.escape(c)}</td>' for c in cells)
        lines.append(f"<tr>{tds}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "-.")


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def render_html(config: ArenaConfig, rows: Sequence[Row], plots: dict[str, bytes], meta: dict[str, Any]) -> str:
    """The report as one HTML page: inline CSS, plots embedded as base64 PNG, no scripts, no links out."""
    header, body = table(config, rows)
    s_header, s_body = sensitivity_table(config, rows)
    status = _status_line(meta)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>danlu arena: {html.escape(meta['task'])}</title><style>{CSS}</style></head><body>",
        f"<h1>danlu arena — {html.escape(meta['title'])}</h1>",
        f"<p class='meta'><b>Data:</b> {html.escape(meta['data'])}</p>",
        f"<p class='meta'><b>Model:</b> {html.escape(meta['model'])}</p>",
        f"<p class='meta'><b>Budget:</b> {html.escape(_budget_line(meta))}</p>",
        f"<p class='meta'><b>Run:</b> {meta['runs']} runs, {meta['train_seconds']} s of training, "
        f"{meta['threads']} thread(s), {html.escape(meta['versions'])}, {html.escape(meta['date'])}</p>",
        f"<div class='banner'>{html.escape(status)}</div>" if status else "",
        "<h2>Training curves</h2>",
        _img(plots["curves_vs_step"], "training loss and validation metric against step"),
        "<h2>Results</h2>",
        _html_table(header, body, "results"),
        "".join(f"<p class='meta'>{html.escape(note)}</p>" for note in meta["notes"]),
        "<h2>Against wall time</h2>",
        _img(plots["curves_vs_time"], "training loss and validation metric against training time"),
        "<h2>Learning-rate sensitivity</h2>",
        _img(plots["lr_sensitivity"], "final validation metric against learning rate"),
        _html_table(s_header, s_body, "sensitivity"),
        "<p class='meta'>Validation metric at the end of the seed-0 run for each swept lr "
        "(columns: multiples of the optimizer's typical lr; * marks the chosen lr).</p>",
        "<h2>How the comparison is made</h2><ul>",
        "".join(f"<li>{html.escape(item)}</li>" for item in FAIRNESS),
        f"<li>Settings given to derivations: {html.escape(_settings_text(meta))}</li></ul>",
        "<p class='meta'>Raw data beside this page: <code>curves.csv</code>, <code>results.json</code>, "
        "<code>summary.md</code>, <code>plots/</code>.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _settings_text(meta: dict[str, Any]) -> str:
    items = [f"{spec}: {', '.join(f'{k}={v}' for k, v in hp.items())}"
             for spec, hp in meta["hyperparameters"].items() if hp]
    return "; ".join(items) if items else "none beyond each optimizer's defaults"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(cells) for cells in body)])


def render_markdown(config: ArenaConfig, rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """The report's table, chosen lrs and sensitivity as Markdown (plots linked from ``plots/``)."""
    header, body = table(config, rows)
    s_header, s_body = sensitivity_table(config, rows)
    status = _status_line(meta)
    lines = [
        f"# danlu arena — {meta['title']}", "",
        f"- Data: {meta['data']}", f"- Model: {meta['model']}", f"- Budget: {_budget_line(meta)}",
        f"- Run: {meta['runs']} runs, {meta['train_seconds']} s of training, {meta['versions']}, {meta['date']}",
        "", *( [f"> {status}", ""] if status else [] ),
        "## Results", "", _md_table(header, body), "", *meta["notes"], "",
        "![training curves](plots/curves_vs_step.png)", "",
        "## Learning-rate sensitivity", "",
        "Validation metric at the end of the seed-0 run (* marks the chosen lr).", "",
        _md_table(s_header, s_body), "", "![lr sensitivity](plots/lr_sensitivity.png)", "",
        "## How the comparison is made", "", *(f"- {item}" for item in FAIRNESS),
        f"- Settings given to derivations: {_settings_text(meta)}", "",
    ]
    return "\n".join(lines)


def _write_csv(path: Path, records: Sequence[RunRecord]) -> Path:
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["curve", "optimizer", "lr", "seed", "step", "time_s", "loss", "metric"])
        for record in sorted(records, key=lambda r: (r.spec, r.lr, r.seed)):
            for i, step in enumerate(record.train.step):
                writer.writerow(["train", record.spec, record.lr, record.seed, step, record.train.time[i],
                                 _cell(record.train.loss[i]), ""])
            for i, step in enumerate(record.evals.step):
                writer.writerow(["val", record.spec, record.lr, record.seed, step, record.evals.time[i],
                                 _cell(record.evals.loss[i]), _cell(record.evals.metric[i])])
    os.replace(temporary, path)
    return path


def _cell(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else repr(float(value))


def _results_json(config: ArenaConfig, rows: Sequence[Row], records: Sequence[RunRecord],
                  meta: dict[str, Any]) -> dict[str, Any]:
    summary = [{
        "optimizer": row.spec, "chosen_lr": row.lr, "lr_note": row.lr_note,
        "metric_mean": row.metric_mean, "metric_std": row.metric_std, "metric_values": row.metric_values,
        "steps_to_target": row.steps_to_target, "reached_target": row.reached,
        "final_train_loss": row.train_loss_mean, "step_time_ms": row.step_time_ms,
        "state_bytes_per_param": row.state_bytes_per_param, "seeds_done": len(row.runs),
        "diverged": row.diverged,
        "sweep": [{"lr": p.lr, "val_metric": p.val_metric, "val_loss": p.val_loss, "diverged": p.diverged}
                  for p in row.sweep],
    } for row in rows]
    return _finite_or_none({"meta": meta, "summary": summary, "runs": [r.to_json() for r in records]})
