"""The arena's tasks by name: bundled data sets, and the user's own table (csv) or texts (text)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from danlu.arena.tasks.base import Evaluation, Task, TaskDefaults, TaskInfo
from danlu.arena.tasks.tensors import TensorTask

__all__ = ["TASKS", "Task", "TaskDefaults", "TaskInfo", "Evaluation", "TensorTask", "make_task"]


def _digits(**options: Any) -> Task:
    from danlu.arena.tasks.digits import DigitsTask

    return DigitsTask(**options)


def _ner_zh(**options: Any) -> Task:
    from danlu.arena.tasks.ner_zh import NerZhTask

    return NerZhTask(**options)


def _sentiment_en(**options: Any) -> Task:
    from danlu.arena.tasks.sentiment_en import SentimentEnTask

    return SentimentEnTask(**options)


def _csv(**options: Any) -> Task:
    from danlu.arena.tasks.table import CsvTask

    return CsvTask(**options)


def _text(**options: Any) -> Task:
    from danlu.arena.tasks.text import TextTask

    return TextTask(**options)


#: Bundled task names and their constructors (keyword options differ per task).
TASKS: dict[str, Callable[..., Task]] = {
    "digits": _digits,
    "ner-zh": _ner_zh,
    "sentiment-en": _sentiment_en,
    "csv": _csv,
    "text": _text,
}


def make_task(name: str, **options: Any) -> Task:
    """Build the bundled task ``name``; an unknown name is a ``ValueError`` listing the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"task must be a task name, got {type(name).__name__}")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name](**options)
