"""The benchmark engine runs end to end on a tiny parameter set and writes its tables."""

from __future__ import annotations

import json

import torch

import danlu
from danlu import bench


def test_bench_writes_json_and_markdown(tmp_path):
    argv = [
        "--sets",
        "many-small,one-big",
        "--scale",
        "0.002",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--only",
        "danlu.adamw,danlu.lamb,sgd",
        "--no-peers",
        "--out",
        str(tmp_path),
        "--tag",
        "t",
    ]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "results-t.json").read_text())
    assert [s["set"] for s in report["sets"]] == ["many-small", "one-big"]
    rows = {r["name"]: r for r in report["sets"][0]["results"]}
    assert bench.REFERENCE in rows and "danlu.AdamW" in rows and "danlu.Lamb" in rows
    assert rows["danlu.AdamW"]["bytes_per_param"] == 28.0
    assert rows["danlu.AdamW"]["ratio"] > 0
    assert 8.0 <= rows["danlu.AdamW"]["state_bytes_per_param"] < 8.5  # m, v and the step counters
    assert "| danlu.AdamW |" in (tmp_path / "results-t.md").read_text()


def test_muon_rows_are_paired_with_torch_muon_per_round(tmp_path):
    argv = ["--sets", "bert", "--scale", "0.005", "--rounds", "3", "--warmup", "1", "--only", "muon", "--no-peers"]
    assert bench.main([*argv, "--no-memory", "--out", str(tmp_path), "--tag", "m"]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "results-m.json").read_text())["sets"][0]["results"]}
    ours, theirs = rows["danlu.Muon"], rows["torch.Muon+Adam"]
    assert ours["paired_with"] == "torch.Muon+Adam" and theirs["paired_with"] is None
    assert ours["paired_ratios"] == [a / b for a, b in zip(ours["times_s"], theirs["times_s"])]
    assert len(rows["danlu.Muon[single]"]["paired_ratios"]) == 3
    assert "- danlu.Muon / torch.Muon+Adam, paired per round: median " in (tmp_path / "results-m.md").read_text()


def test_unknown_set_is_an_error(tmp_path):
    assert bench.main(["--sets", "nope", "--only", "danlu.sgd", "--no-peers", "--no-torch", "--out", str(tmp_path)]) == 2


def test_peak_memory_sees_temporaries():
    p = torch.nn.Parameter(torch.randn(256, 64))
    p.grad = torch.randn(256, 64)
    foreach = danlu.AdamW([p], lr=1e-3, foreach=True)
    foreach.step()
    with bench.PeakMemory() as peak:
        foreach.step()
    assert peak.peak >= p.numel() * p.element_size()  # the update of the chunk, at least
    fast = danlu.AdamW([torch.nn.Parameter(torch.randn(256, 64))], lr=1e-3)
    fast.param_groups[0]["params"][0].grad = torch.randn(256, 64)
    fast.step()
    with bench.PeakMemory() as peak:
        fast.step()
    if danlu._native.available():
        assert peak.peak < p.numel() * p.element_size()  # nothing parameter-sized


def test_traffic_model_of_adafactor():
    assert bench.adafactor_transfers([(768, 768)]) == 6
    assert bench.adafactor_transfers([(768,)]) == 8
    assert bench.adafactor_transfers([(768, 768), (768,)]) == (6 * 768 * 768 + 8 * 768) / (768 * 768 + 768)
