"""The derivations: one file each, each a small set of hooks (see ``danlu.derivations._base``)."""

from danlu.derivations._base import Derivation
from danlu.derivations.exponential_moving_average import ExponentialMovingAverage
from danlu.derivations.gradient_accumulation import GradientAccumulation
from danlu.derivations.gradient_clipping import GradientClipping
from danlu.derivations.layer_adaptation import LayerAdaptation
from danlu.derivations.lazy_optimization import LazyOptimization
from danlu.derivations.lookahead import Lookahead
from danlu.derivations.parameter_wise_lr import ParameterWiseLR
from danlu.derivations.piecewise_linear_lr import PiecewiseLinearLR
from danlu.derivations.schedule_free import ScheduleFree
from danlu.derivations.skip_nonfinite import SkipNonfinite
from danlu.derivations.weight_decay import WeightDecay

ALL_DERIVATIONS: tuple[Derivation, ...] = (
    WeightDecay(),
    LayerAdaptation(),
    PiecewiseLinearLR(),
    GradientAccumulation(),
    Lookahead(),
    LazyOptimization(),
    ExponentialMovingAverage(),
    ParameterWiseLR(),
    ScheduleFree(),
    SkipNonfinite(),
    GradientClipping(),
)
"""One instance of every derivation, in the order of the contract's table (then danlu's additions)."""

__all__ = [
    "ALL_DERIVATIONS",
    "Derivation",
    "WeightDecay",
    "LayerAdaptation",
    "PiecewiseLinearLR",
    "GradientAccumulation",
    "Lookahead",
    "LazyOptimization",
    "ExponentialMovingAverage",
    "ParameterWiseLR",
    "ScheduleFree",
    "SkipNonfinite",
    "GradientClipping",
]
