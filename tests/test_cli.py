"""The ``danlu`` command: bad input fails cleanly before training; a tiny arena runs; ``python -m danlu`` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from danlu.arena import arena as arena_module
from danlu.cli.main import EXIT_USAGE, main

pytest.importorskip("sklearn")


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any training step is a test failure: errors must come before training starts."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(arena_module, "train_run", fail)


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


BAD_INPUT = [
    (["--task", "mnist"], ["unknown task 'mnist'", "digits, ner-zh, sentiment-en"]),
    (["--optimizers", "adamw,adamx"], ["unknown optimizer 'adamx'", "sgdm", "lion", "ranger"]),
    (["--optimizers", "adamw+lookahed"], ["unknown derivation 'lookahed'", "lookahead", "ema"]),
    (["--optimizers", ""], ["optimizers is empty"]),
    (["--optimizers", "adam,adam"], ["more than once"]),
    (["--steps", "0"], ["steps must be >= 1"]),
    (["--steps", "-5"], ["steps must be >= 1"]),
    (["--seeds", "0"], ["seeds must be >= 1"]),
    (["--eval-every", "0"], ["eval_every must be >= 1"]),
    (["--lr-grid", ""], ["lr_grid is empty"]),
    (["--lr-grid", " , "], ["lr_grid is empty"]),
    (["--lr-grid", "1,-3"], ["lr_grid values must be finite numbers > 0"]),
    (["--lr-grid", "1,x"], ["lr_grid must be comma-separated numbers"]),
    (["--threads", "0"], ["threads must be >= 1"]),
    (["--trainable-layers", "2"], ["--trainable-layers applies to sentiment-en"]),
    (["--task", "ner-zh", "--head", "lstm"], ["head must be one of softmax, crf"]),
    (["--task", "ner-zh", "--subset", "0"], ["subset must be >= 1"]),
    (["--task", "sentiment-en", "--trainable-layers", "9"], ["trainable_layers must be in [0, 6]"]),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT, ids=[" ".join(a) or "empty" for a, _ in BAD_INPUT])
def test_bad_input_is_a_clean_error_before_training(
    args: list[str], expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    out = tmp_path / "report"
    status = main(["arena", "--out", str(out), "--quiet", *args])
    captured = capsys.readouterr()
    assert status == EXIT_USAGE
    assert captured.err.startswith("danlu arena: error: ")
    for text in expected:
        assert text in captured.err
    assert "Traceback" not in captured.err
    assert not (out / "runs").exists()


def test_output_folder_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None) -> None:
    status = main(["arena", "--out", str(_file(tmp_path)), "--quiet"])
    assert status == EXIT_USAGE
    assert "exists and is not a folder" in capsys.readouterr().err


def test_output_folder_that_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              no_training: None) -> None:
    status = main(["arena", "--out", str(_file(tmp_path) / "report"), "--quiet"])
    assert status == EXIT_USAGE
    assert "out: cannot write the report to" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="file permissions do not stop root from writing")
def test_output_folder_without_write_permission(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                no_training: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    status = main(["arena", "--out", str(locked), "--quiet"])
    assert status == EXIT_USAGE
    assert "cannot write" in capsys.readouterr().err


def test_sentiment_without_data_says_how_to_fetch_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     no_training: None) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    status = main(["arena", "--task", "sentiment-en", "--data-dir", str(empty), "--out", str(tmp_path / "r"),
                   "--quiet"])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE
    assert "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2" in err


ARGPARSE_MISTAKES = [
    (["arena", "--steps", "ten"], "danlu arena: error: argument --steps: expected an integer, got 'ten' (see danlu arena --help)"),
    (["arena", "--task"], "danlu arena: error: argument --task: expected one argument (see danlu arena --help)"),
    (["arena", "--stepz", "3"], "danlu: error: unrecognized arguments: --stepz 3 (see danlu --help)"),
    (["arean"], "danlu: error: argument COMMAND: invalid choice: 'arean' (choose from 'arena', 'list', 'bench') "
                "(see danlu --help)"),
]


@pytest.mark.parametrize(("args", "line"), ARGPARSE_MISTAKES, ids=[" ".join(a) for a, _ in ARGPARSE_MISTAKES])
def test_a_command_line_mistake_is_one_line(args: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == line + "\n"
    assert captured.out == ""


def test_zero_threads_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None) -> None:
    assert main(["arena", "--threads", "0", "--quiet", "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert capsys.readouterr().err == "danlu arena: error: threads must be >= 1, got 0 (torch runs on at least one CPU thread)\n"


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    import danlu

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"danlu {importlib.metadata.version('danlu')}\n"
    assert danlu.__version__ == importlib.metadata.version("danlu")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert "arena" in capsys.readouterr().out


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "digits, ner-zh, sentiment-en" in out and "lookahead" in out and "adamw+ema" in out


def test_arena_tiny_run_prints_table_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["arena", "--optimizers", "adam,lion", "--steps", "10", "--seeds", "1", "--lr-grid", "1",
            "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "adam" in out and "lion" in out and "report.html" in out
    assert (tmp_path / "report.html").is_file()
    assert main(args) == 0  # everything is in the folder already: nothing to train


def test_python_dash_m_danlu_bad_input_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "danlu", "arena", "--steps", "0", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == EXIT_USAGE
    assert "danlu arena: error: steps must be >= 1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.environ.get("DANLU_ARENA_FULL") != "1",
                    reason="the full default arena takes ~30 s; set DANLU_ARENA_FULL=1 to time it")
def test_default_arena_finishes_within_a_minute(tmp_path: Path) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "danlu", "arena", "--out", str(tmp_path), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "report.html").is_file()
    assert elapsed < 60, f"danlu arena took {elapsed:.1f} s"


def test_bench_subcommand_writes_its_tables(tmp_path: Path) -> None:
    from danlu.cli.main import main

    status = main(["bench", "--sets", "many-small", "--scale", "0.01", "--rounds", "1", "--warmup", "1",
                   "--only", "adamw,lion", "--no-peers", "--no-memory", "--out", str(tmp_path), "--tag", "cli"])
    assert status == 0
    report = json.loads((tmp_path / "results-cli.json").read_text())
    names = {row["name"] for row in report["sets"][0]["results"]}
    assert any("danlu" in name and "Lion" in name for name in names)
    assert (tmp_path / "results-cli.md").read_text().count("|") > 10
