"""danlu: optimizers and derived optimizers for PyTorch."""

from danlu import distributed as distributed  # DDP gradient accumulation with one all-reduce per applied step
from danlu import grouping as grouping  # timm-style parameter groups, layer-wise lr decay
from danlu import integrations as integrations  # Trainer / Lightning helpers; imports no framework itself
from danlu.base import DanluOptimizer
from danlu.cli.main import version as _installed_version
from danlu.derive import (
    extend_with_exponential_moving_average,
    extend_with_gradient_accumulation,
    extend_with_gradient_clipping,
    extend_with_layer_adaptation,
    extend_with_lazy_optimization,
    extend_with_lookahead,
    extend_with_parameter_wise_lr,
    extend_with_piecewise_linear_lr,
    extend_with_schedule_free,
    extend_with_skip_nonfinite,
    extend_with_weight_decay,
)
from danlu.factory import create_optimizer
from danlu.optimizers import SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, LazyAdam, Lion, Muon, NAdam, RAdam, RMSprop
from danlu.ready import AdamW, Lamb, Ranger

__version__ = _installed_version()  # the package's metadata, as `danlu --version` prints it
del _installed_version

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
    "Adamax",
    "Muon",
    "LazyAdam",
    "AdamW",
    "Lamb",
    "Ranger",
    "extend_with_weight_decay",
    "extend_with_layer_adaptation",
    "extend_with_piecewise_linear_lr",
    "extend_with_gradient_accumulation",
    "extend_with_lookahead",
    "extend_with_lazy_optimization",
    "extend_with_exponential_moving_average",
    "extend_with_parameter_wise_lr",
    "extend_with_skip_nonfinite",
    "extend_with_gradient_clipping",
    "extend_with_schedule_free",
    "create_optimizer",
    "distributed",
]
