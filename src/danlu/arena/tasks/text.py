"""`text`: sequence classification of the user's own texts with a local Hugging Face model directory.

The model directory is anything saved with ``save_pretrained`` (a ``config.json``
beside the weights and the tokenizer files); it is loaded offline. A plain
encoder gets a fresh classification head sized to the data's classes; a model
that already has a classification head keeps it when its labels fit the data's
(by name), and is an error when they do not.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu.arena._checks import check_optional_positive_int, check_positive_int
from danlu.arena.tasks.base import Baseline, Evaluation, Task, TaskDefaults, TaskInfo, majority_baseline
from danlu.arena.tasks.files import (
    check_column_name,
    check_file,
    class_labels,
    file_digest,
    read_records,
    require_column,
    stratified_split,
)
from danlu.arena.tasks.sentiment_en import _layer_index, trainable_parameters, trim_padding, trimmed_batches


def check_model_dir(path: Any) -> Path:
    """A folder with a ``config.json``; else an error naming ``model``."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"model must be a folder path, got {type(path).__name__} {path!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model: no such folder: {str(folder)!r}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model: {str(folder)!r} has no config.json; give a Hugging Face model folder "
                         "(one written by save_pretrained)")
    return folder


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ImportError("task 'text' needs transformers: pip install transformers") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _head_labels(config: Any) -> list[str] | None:
    """The labels of a trained classification head, or None when the checkpoint has none."""
    architectures = getattr(config, "architectures", None) or []
    if not any(str(name).endswith("ForSequenceClassification") for name in architectures):
        return None
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


class TextTask(Task):
    """Fine-tune a local Hugging Face model on ``text_column`` -> ``label_column`` of a CSV or JSON Lines file."""

    name = "text"
    metric = "accuracy"
    higher_is_better = True
    lr_scale = 0.1  # fine-tuning a pretrained model wants small steps

    def __init__(self, *, model: str | os.PathLike[str] | None = None, data: str | os.PathLike[str] | None = None,
                 text_column: str = "text", label_column: str = "label", batch_size: int = 16, max_len: int = 128,
                 trainable_layers: int | None = None, subset: int | None = None) -> None:
        if model is None or data is None:
            raise ValueError("task 'text' needs a model folder and a data file: --model DIR --data FILE "
                             "(--text-column C --label-column C)")
        self.model_dir = check_model_dir(model)
        self.path = check_file("data", data)
        self.text_column = check_column_name("text_column", text_column)
        self.label_column = check_column_name("label_column", label_column)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_len = check_positive_int("max_len", max_len)
        if trainable_layers is not None and (isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int)
                                             or trainable_layers < 0):
            raise ValueError(f"trainable_layers must be an int >= 0 (0: only the classification head), "
                             f"got {trainable_layers!r}")
        self.trainable_layers = trainable_layers
        self.subset = check_optional_positive_int("subset", subset)
        self.defaults = TaskDefaults(steps=100, seeds=3, eval_every=10, lr_grid=(0.3, 1.0, 3.0))
        self.classes: list[str] = []
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._model: nn.Module | None = None
        self._new_modules: list[str] = []
        self._digest = ""

    def prepare(self) -> None:
        if self.splits:
            return
        transformers = _transformers()
        header, rows = read_records(self.path)
        require_column("text_column", self.text_column, header, self.path)
        require_column("label_column", self.label_column, header, self.path)
        self.classes, labels = class_labels("label_column", self.label_column, rows, self.path)
        config = transformers.AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        head = _head_labels(config)
        if head is not None:
            labels = self._fit_head(head, labels)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model: cannot load a tokenizer from {str(self.model_dir)!r} ({exc})") from None
        self._load_model(transformers, len(self.classes))
        texts = [str(row.get(self.text_column) or "") for row in rows]
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt")
        ids, mask, target = encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels)
        self._digest = file_digest(self.path)
        for name, index in stratified_split(labels).items():
            index = index[: self.subset] if name == "train" and self.subset else index
            self.splits[name] = (ids[index], mask[index], target[index])

    def _fit_head(self, head: list[str], labels: list[int]) -> list[int]:
        """Map the data's classes onto a trained head's labels; an error when they do not fit."""
        if not set(self.classes) <= set(head):
            raise ValueError(
                f"label_column: the labels of {self.path.name} ({', '.join(self.classes)}) do not fit the "
                f"classification head of {self.model_dir.name} ({', '.join(head)}); use a model without a head, "
                "or data whose labels are among the head's")
        mapping = [head.index(name) for name in self.classes]
        self.classes = head
        return [mapping[label] for label in labels]

    def _load_model(self, transformers: Any, classes: int) -> None:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(self.model_dir), num_labels=classes, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=False)
        missing = list(info.get("missing_keys", []))
        self._new_modules = sorted({key.rsplit(".", 1)[0] for key in missing})
        self._model = model

    def make_model(self, seed: int) -> nn.Module:
        if self._model is None:
            raise RuntimeError("prepare() must run before make_model()")
        model = copy.deepcopy(self._model)
        modules = dict(model.named_modules())
        for name in self._new_modules:  # a fresh head, drawn from this seed
            module = modules.get(name)
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.trainable_layers is not None:
            self._freeze(model)
        return model

    def _freeze(self, model: nn.Module) -> None:
        """Train the top ``trainable_layers`` transformer layers and everything outside the encoder's layers."""
        layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
        first = layers - int(self.trainable_layers or 0)
        base = getattr(model, "base_model", model)
        for name, parameter in base.named_parameters():
            layer = _layer_index(name)
            parameter.requires_grad_(layer is not None and layer >= first)

    def optimizer_parameters(self, model: nn.Module) -> Any:
        return trainable_parameters(model)

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        return trimmed_batches(self.splits["train"], self.batch_size, seed)

    _trim = staticmethod(trim_padding)


    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, mask, labels = batch
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        ids, mask, labels = self.splits[split]
        logits = torch.cat([model(*self._trim(i, m)).logits
                            for i, m in zip(ids.split(64), mask.split(64), strict=True)])
        loss = float(F.cross_entropy(logits, labels))
        return Evaluation(loss=loss, metric=float((logits.argmax(-1) == labels).float().mean()))

    def baseline(self, split: str) -> Baseline | None:
        return majority_baseline(self.splits["train"][2], self.splits[split][2]) if self.splits else None

    def info(self) -> TaskInfo:
        sizes = " / ".join(f"{len(self.splits[name][2])} {label}" for name, label in
                           (("train", "train"), ("val", "validation"), ("test", "test")) if name in self.splits)
        trained = "all layers" if self.trainable_layers is None else f"top {self.trainable_layers} layer(s)"
        return TaskInfo(
            title=f"text: {self.path.name}, {self.label_column!r} from {self.text_column!r}",
            data=f"{self.path} ({len(self.classes)} classes: {', '.join(self.classes[:8])}); stratified split {sizes}",
            model=f"{self.model_dir} with a sequence-classification head; {trained} trained, up to {self.max_len} "
                  f"tokens, batch {self.batch_size}",
            metric_label="accuracy",
        )

    def fingerprint(self) -> dict[str, Any]:
        return {"task": self.name, "model": str(self.model_dir.resolve()), "data": str(self.path.resolve()),
                "digest": self._digest, "text_column": self.text_column, "label_column": self.label_column,
                "batch_size": self.batch_size, "max_len": self.max_len, "trainable_layers": self.trainable_layers,
                "subset": self.subset}
