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
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import danlu
from danlu.arena.decision import CONFIDENCE, TEST_NAME, Comparison
from danlu.arena.records import RunRecord, _finite_or_none
from danlu.arena.roster import extend_grid, typical_lr
from danlu.arena.summary import Row, SweepPoint, fmt_lr, fmt_metric, fmt_number, fmt_steps
from danlu.arena.timing import WARMUP_STEPS

if TYPE_CHECKING:  # pragma: no cover - typing only, avoids an import cycle
    from danlu.arena.arena import ArenaConfig, ArenaResult

HTML_NAME = "report.html"
MARKDOWN_NAME = "summary.md"
CSV_NAME = "curves.csv"
JSON_NAME = "results.json"


def _split(config: ArenaConfig) -> str:
    return "test" if config.task.has_split("test") else "validation"


def primary_metric(config: ArenaConfig) -> str:
    """The metric everything is ranked by, in words: e.g. "final test accuracy"."""
    direction = "" if config.task.higher_is_better else " (lower is better)"
    return f"final {_split(config)} {config.task.info().metric_label}{direction}"


def table(result: ArenaResult) -> tuple[list[str], list[list[str]]]:
    """The results table as header and string cells, shared by the HTML, Markdown and terminal views."""
    config, rows, pick = result.config, result.rows, result.recommendation
    task = config.task
    label = task.info().metric_label
    header = ["#", "optimizer", "chosen lr", f"{_split(config)} {label}: mean [95% CI]", "vs the pick (paired, 95%)"]
    if task.target is not None:
        header.append(f"2nd: steps to val {label} ≥ {task.target:g}")
    header += ["final train loss", "ms / step", "optimizer state", "seeds", "note"]
    comparisons = {c.spec: c for c in pick.comparisons} if pick is not None else {}
    body = []
    for rank, row in enumerate(rows, 1):
        name = row.spec + (" (EMA weights)" if row.ema else "")
        cells = [str(rank), name, fmt_lr(row.lr), fmt_metric(row.metric_interval),
                 _versus(row, pick.spec if pick else None, comparisons)]
        if task.target is not None:
            cells.append(fmt_steps(row))
        cells += [fmt_number(row.train_loss_mean, 3), _time_cell(row), _state_cell(row),
                  f"{len(row.runs)}/{row.seeds_planned}", _note(row)]
        body.append(cells)
    return header, body


def _versus(row: Row, pick: str | None, comparisons: dict[str, Comparison]) -> str:
    if row.spec == pick:
        return "the pick"
    comparison = comparisons.get(row.spec)
    if comparison is None:
        return "—"
    difference = comparison.difference
    if difference.count < 2:
        return f"tied ({difference.count} seed{'s' if difference.count != 1 else ''})"
    word = "tied" if comparison.tied else "worse"
    return f"{word}: {-difference.mean:+.4f} [{-difference.high:+.4f}, {-difference.low:+.4f}]"


def _time_cell(row: Row) -> str:
    if row.timing is None:
        return fmt_number(row.step_time_ms, 3)
    return f"{fmt_number(row.timing.median_ms, 3)} (±{row.timing.spread * 50:.0f}%)"  # half the IQR


def _state_cell(row: Row) -> str:
    total = row.state_bytes
    if total is None:
        return fmt_number(row.state_bytes_per_param, 3) + " B/param"
    return f"{total:,} B ({fmt_number(row.state_bytes_per_param, 3)} B/param)"


def _note(row: Row) -> str:
    notes = [row.lr_note]
    if row.diverged:
        notes.append(f"{row.diverged} seed(s) diverged")
    if row.stuck_seeds:
        notes.append(f"{row.stuck_seeds} seed(s) stuck at chance")
    return "; ".join(n for n in notes if n)


def sensitivity_table(result: ArenaResult) -> tuple[list[str], list[list[str]]]:
    """Validation metric for each optimizer at each multiplier of its typical lr (extensions included)."""
    config = result.config
    multipliers = sorted({_multiplier(config, row.spec, p.lr) for row in result.rows for p in row.sweep}
                         | set(config.lr_grid))
    base = set(config.lr_grid)
    header = ["optimizer"] + [f"×{m:.3g}" + ("" if m in base else " (ext.)") for m in multipliers]
    body = []
    for row in result.rows:
        by_multiplier = {_multiplier(config, row.spec, p.lr): p for p in row.sweep}
        cells = [row.spec]
        for m in multipliers:
            point = by_multiplier.get(m)
            cells.append("—" if point is None else _sweep_cell(point, point.lr == row.lr))
        body.append(cells)
    return header, body


def _multiplier(config: ArenaConfig, spec: str, lr: float) -> float:
    """The grid multiplier that gave ``lr`` (the grid's own value where it is one, so that columns line up)."""
    centre = typical_lr(spec) * config.task.lr_scale
    exact = lr / centre
    candidates = extend_grid(config.lr_grid, config.lr_extend, config.lr_extend)
    return min(candidates, key=lambda m: abs(math.log(m / exact)))


def _sweep_cell(point: SweepPoint, chosen: bool) -> str:
    if point.diverged:
        value = "diverged"
    elif point.stuck:
        value = f"{fmt_number(point.val_metric, 4)} (chance)"
    else:
        value = fmt_number(point.val_metric, 4)
    return f"{point.lr:.3g}: {value}{' *' if chosen else ''}"


def write_report(result: ArenaResult) -> dict[str, Path]:
    """Write every file of the report into ``config.out`` and return their paths."""
    config = result.config
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(result)
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    files: dict[str, Path] = {}
    for name, data in plots.items():
        path = plot_dir / f"{name}.png"
        path.write_bytes(data)
        files[f"plot:{name}"] = path
    meta = _meta(result)
    files["html"] = _write(out / HTML_NAME, render_html(result, plots, meta))
    files["markdown"] = _write(out / MARKDOWN_NAME, render_markdown(result, meta))
    files["csv"] = _write_csv(out / CSV_NAME, result.records)
    files["json"] = _write(out / JSON_NAME, json.dumps(_results_json(result, meta), indent=1))
    return files


def _write(path: Path, text: str) -> Path:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def _plots(result: ArenaResult) -> dict[str, bytes]:
    from danlu.arena.plots import curves_figure, intervals_figure, sensitivity_figure

    config, rows = result.config, result.rows
    styles = {spec: i for i, spec in enumerate(config.optimizers)}
    label = config.task.info().metric_label
    shown = [row for row in rows if row.runs]
    pick = result.recommendation
    tied = set(pick.tied) if pick is not None else set()
    return {
        "intervals": intervals_figure(shown, primary_metric(config), styles, pick.spec if pick else None, tied),
        "curves_vs_step": curves_figure(shown, "step", label, styles),
        "curves_vs_time": curves_figure(shown, "time", label, styles),
        "lr_sensitivity": sensitivity_figure(rows, label, styles),
    }


def _meta(result: ArenaResult) -> dict[str, Any]:
    config, rows, records = result.config, result.rows, result.records
    info = config.task.info()
    incomplete = [row.spec for row in rows if not row.complete]
    workers = config.worker_count()
    return {
        "title": info.title, "data": info.data, "model": info.model, "notes": info.notes,
        "metric": config.task.metric, "task": config.task.name, "primary_metric": primary_metric(config),
        "steps": config.steps, "seeds": config.seeds, "eval_every": config.eval_every,
        "lr_grid": list(config.lr_grid), "lr_extend": config.lr_extend, "optimizers": list(config.optimizers),
        "hyperparameters": {spec: {k: str(v) for k, v in config.settings(spec).items()} for spec in config.optimizers},
        "interrupted": result.interrupted, "incomplete": incomplete,
        "failed": {key.label(): message for key, message in result.failed.items()},
        "runs": len(records), "train_seconds": round(sum(r.wall_s for r in records), 1),
        "wall_seconds": round(result.wall_s, 1),
        "backend": config.backend, "workers": workers if config.backend == "local" else None,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": f"danlu {danlu.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "threads": config.threads_per_run(workers) or torch.get_num_threads(),
        "timing_threads": config.threads or 1,
    }


def recommendation_lines(result: ArenaResult) -> list[str]:
    """The recommendation in words: the pick, what it is measured by, what it is tied with, and the caveats."""
    config, pick = result.config, result.recommendation
    metric = primary_metric(config)
    if pick is None or pick.spec is None or pick.metric is None:
        return ["No recommendation: no optimizer finished every seed."]
    lines = [f"Recommendation: {pick.spec} at lr {pick.lr:.3g} — the best {metric}, "
             f"{fmt_metric(pick.metric)} over {pick.seeds} seed{'s' if pick.seeds != 1 else ''}."]
    verdict = pick.verdict
    if verdict == "one seed":
        lines.append("With one seed nothing can be told apart: every finished optimizer is tied with it. "
                     "Rerun with --seeds 3 or more for a recommendation that means something.")
    elif verdict == "all tied":
        others = len(pick.comparisons)
        whom = "the other optimizer" if others == 1 else f"none of the other {others} optimizers"
        verb = " cannot" if others == 1 else " can"
        lines.append(f"The seeds are too few to separate anything: {whom}{verb} be told apart from it ({TEST_NAME}, "
                     f"{CONFIDENCE:.0%}). More seeds would narrow the intervals.")
    elif pick.tied:
        lines.append(f"Tied with it (cannot be told apart; {TEST_NAME}, {CONFIDENCE:.0%} two-sided interval of the "
                     f"per-seed difference contains 0): {', '.join(pick.tied)}.")
        lines.append("Every other optimizer is worse by a margin the seeds resolve.")
    else:
        lines.append(f"No other optimizer is tied with it ({TEST_NAME}, {CONFIDENCE:.0%}): each is worse by a "
                     "margin the seeds resolve.")
    if len(config.lr_grid) == 1:
        lines.append("Learning rates were not tuned (a one-point grid): this compares the optimizers at their "
                     "typical lrs only.")
    lines.append(f"Ranked by {metric}; steps to target comes second. Time per step takes no part in the ranking.")
    return lines


def _status_line(meta: dict[str, Any]) -> str:
    parts = []
    if meta["interrupted"]:
        parts.append("Interrupted: this report shows the runs that finished. Run the same command again "
                     "with the same output folder to resume.")
    elif meta["incomplete"]:
        parts.append("Incomplete: " + ", ".join(meta["incomplete"]) + " did not finish every run.")
    if meta["failed"]:
        parts.append(f"{len(meta['failed'])} run(s) failed and were not kept (a rerun tries them again): "
                     + "; ".join(f"{key}: {message}" for key, message in meta["failed"].items()))
    return " ".join(parts)


def _budget_line(meta: dict[str, Any]) -> str:
    grid = ", ".join(f"{m:g}" for m in meta["lr_grid"])
    sweep = (f"lr sweep: typical lr × [{grid}] on seed 0, up to {meta['lr_extend']} more lr(s) beyond an edge "
             "where the best sits" if len(meta["lr_grid"]) > 1 else "no lr sweep: typical lr only (untuned)")
    return (f"{meta['steps']} steps per run, validation every {meta['eval_every']} steps, "
            f"{meta['seeds']} seed(s) at the chosen lr; {sweep}")


def _run_line(meta: dict[str, Any]) -> str:
    where = (f"{meta['workers']} worker process(es)" if meta["backend"] == "local" and meta["workers"] != 1
             else "Ray tasks" if meta["backend"] == "ray" else "one process")
    return (f"{meta['runs']} runs in {meta['wall_seconds']} s of wall time, timing included "
            f"({meta['train_seconds']} s summed over runs; "
            f"{where}, {meta['threads']} thread(s) per run), {meta['versions']}, {meta['date']}")


def timing_line(result: ArenaResult) -> str:
    """How step time was measured, and how far identical measurements spread."""
    spreads = [row.timing.spread for row in result.rows if row.timing is not None]
    if not spreads:
        return ("Time per step: the median over each run's steps (no separate timing was made); it varies "
                "between identical runs on a busy machine and takes no part in any ranking.")
    first = next(row.timing for row in result.rows if row.timing is not None)
    return (f"Time per step (forward, backward, optimizer step) is measured after training, apart from it: each "
            f"optimizer at its chosen lr, {first.rounds} rounds of {first.steps_per_round} steps taken in turn "
            f"after {WARMUP_STEPS} warm-up steps, {result.config.threads or 1} thread, one process; the table "
            f"gives the median round and ± half the interquartile range of the rounds. Between identical rounds "
            f"the interquartile range was {statistics.median(spreads):.0%} of the median (median over optimizers; "
            f"largest {max(spreads):.0%}) on this machine. Time takes no "
            "part in any ranking. Optimizer state is exact: the bytes of every tensor in optimizer.state.")


FAIRNESS = [
    "Every optimizer trains the same model from the same initialisation, on the same batches in the same "
    "order, for the same number of steps (seed by seed).",
    "Each optimizer's learning rate is chosen by the same rule: a log grid around its typical lr, trained on "
    "seed 0, best final validation metric (ties: lower validation loss). When the best lr sits at an edge, "
    "the grid grows in that direction before the choice. Runs that diverge (a non-finite loss) or stay at "
    "chance (no better than always answering the most common class, or the task's trivial predictor) are "
    "marked and never chosen.",
    "Final numbers are on held-out data over every seed at the chosen lr; the seed-0 run of the sweep is one "
    "of them (it is the same computation). Intervals are Student-t 95% intervals over seeds.",
    "The recommendation compares optimizers seed by seed (a paired t-test over seeds, 95%): an optimizer whose "
    "interval of the per-seed difference from the pick contains 0 is tied with it. Comparisons are not "
    "corrected for their number.",
    "An EMA optimizer is evaluated with its averaged weights (marked \"EMA weights\").",
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
.pick{background:#e9f6ec;border:2px solid #3c9a5f;padding:12px 16px;margin:14px 0;font-size:16px}
.pick p{margin:4px 0}.pick p.first{font-size:19px;font-weight:600}
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


def render_html(result: ArenaResult, plots: dict[str, bytes], meta: dict[str, Any]) -> str:
    """The report as one HTML page: inline CSS, plots embedded as base64 PNG, no scripts, no links out."""
    header, body = table(result)
    s_header, s_body = sensitivity_table(result)
    status = _status_line(meta)
    pick = recommendation_lines(result)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>danlu arena: {html.escape(meta['task'])}</title><style>{CSS}</style></head><body>",
        f"<h1>danlu arena — {html.escape(meta['title'])}</h1>",
        "<div class=\"pick\" id=\"recommendation\">"
        + "".join(f"<p class='{'first' if i == 0 else 'more'}'>{html.escape(line)}</p>" for i, line in enumerate(pick))
        + "</div>",
        f"<div class='banner'>{html.escape(status)}</div>" if status else "",
        f"<p class='meta'><b>Primary metric:</b> {html.escape(meta['primary_metric'])}, mean over seeds; "
        "second: steps to target.</p>",
        f"<p class='meta'><b>Data:</b> {html.escape(meta['data'])}</p>",
        f"<p class='meta'><b>Model:</b> {html.escape(meta['model'])}</p>",
        f"<p class='meta'><b>Budget:</b> {html.escape(_budget_line(meta))}</p>",
        f"<p class='meta'><b>Run:</b> {html.escape(_run_line(meta))}</p>",
        "<h2>Results</h2>",
        _html_table(header, body, "results"),
        "".join(f"<p class='meta'>{html.escape(note)}</p>" for note in meta["notes"]),
        f"<p class='meta'>{html.escape(timing_line(result))}</p>",
        _img(plots["intervals"], "final metric of each optimizer with its 95% interval over seeds"),
        "<h2>Training curves</h2>",
        _img(plots["curves_vs_step"], "training loss and validation metric against step, and the metric zoomed"),
        "<h2>Against wall time</h2>",
        _img(plots["curves_vs_time"], "training loss and validation metric against training time"),
        "<h2>Learning-rate sensitivity</h2>",
        _img(plots["lr_sensitivity"], "final validation metric against learning rate"),
        _html_table(s_header, s_body, "sensitivity"),
        "<p class='meta'>Validation metric at the end of the seed-0 run for each swept lr (columns: multiples of "
        "the optimizer's typical lr; ext.: added because the best lr sat at that edge; * marks the chosen lr; "
        "chance: no better than the trivial predictor).</p>",
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


def render_markdown(result: ArenaResult, meta: dict[str, Any]) -> str:
    """The recommendation, the table, chosen lrs and sensitivity as Markdown (plots linked from ``plots/``)."""
    header, body = table(result)
    s_header, s_body = sensitivity_table(result)
    status = _status_line(meta)
    lines = [
        f"# danlu arena — {meta['title']}", "",
        *(f"**{line}**" if i == 0 else line for i, line in enumerate(recommendation_lines(result))), "",
        *([f"> {status}", ""] if status else []),
        f"- Primary metric: {meta['primary_metric']}, mean over seeds; second: steps to target",
        f"- Data: {meta['data']}", f"- Model: {meta['model']}", f"- Budget: {_budget_line(meta)}",
        f"- Run: {_run_line(meta)}", "",
        "## Results", "", _md_table(header, body), "", *meta["notes"], "", timing_line(result), "",
        "![final metric with 95% intervals](plots/intervals.png)", "",
        "![training curves](plots/curves_vs_step.png)", "",
        "## Learning-rate sensitivity", "",
        "Validation metric at the end of the seed-0 run (* marks the chosen lr; ext.: added because the best lr "
        "sat at that edge; chance: no better than the trivial predictor).", "",
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


def _results_json(result: ArenaResult, meta: dict[str, Any]) -> dict[str, Any]:
    pick = result.recommendation
    summary = [{
        "optimizer": row.spec, "chosen_lr": row.lr, "lr_note": row.lr_note,
        "metric_mean": row.metric_mean, "metric_ci95": [row.metric_interval.low, row.metric_interval.high],
        "metric_std": row.metric_std, "metric_values": row.metric_values,
        "steps_to_target": row.steps_to_target, "reached_target": row.reached,
        "final_train_loss": row.train_loss_mean, "step_time_ms": row.step_time_ms,
        "step_time_spread": row.timing.spread if row.timing is not None else None,
        "state_bytes": row.state_bytes, "state_bytes_per_param": row.state_bytes_per_param,
        "seeds_done": len(row.runs), "diverged": row.diverged, "stuck_seeds": row.stuck_seeds,
        "ema_weights": row.ema,
        "sweep": [{"lr": p.lr, "val_metric": p.val_metric, "val_loss": p.val_loss, "diverged": p.diverged,
                   "stuck": p.stuck, "extended": p.extended} for p in row.sweep],
    } for row in result.rows]
    recommendation: dict[str, Any] = {"optimizer": None, "lr": None, "tied": []}
    if pick is not None and pick.spec is not None:
        recommendation = {
            "optimizer": pick.spec, "lr": pick.lr, "tied": list(pick.tied), "metric": meta["primary_metric"],
            "test": TEST_NAME, "confidence": CONFIDENCE, "seeds": pick.seeds, "verdict": pick.verdict,
            "comparisons": [{"optimizer": c.spec, "difference_mean": c.difference.mean,
                             "difference_ci95": [c.difference.low, c.difference.high], "tied": c.tied}
                            for c in pick.comparisons],
        }
    return _finite_or_none({"meta": meta, "recommendation": recommendation, "summary": summary,
                            "runs": [r.to_json() for r in result.records]})
