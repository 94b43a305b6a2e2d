"""danlu: optimizers and derived optimizers for PyTorch."""

from danlu.base import DanluOptimizer
from danlu.optimizers import SGD, Adadelta, Adafactor, Adagrad, Adam, LazyAdam, Lion, NAdam, RAdam, RMSprop

__version__ = "0.1.0"

__all__ = [
    "DanluOptimizer",
    "SGD",
    "Adagrad",
    "Adadelta",
    "RMSprop",
    "Adam",
    "NAdam",
    "RAdam",
    "Adafactor",
    "Lion",
    "LazyAdam",
]
