"""danlu's base optimizers, one file per algorithm."""

from danlu.optimizers.adadelta import Adadelta
from danlu.optimizers.adafactor import Adafactor
from danlu.optimizers.adagrad import Adagrad
from danlu.optimizers.adam import Adam
from danlu.optimizers.adamax import Adamax
from danlu.optimizers.lazy_adam import LazyAdam
from danlu.optimizers.lion import Lion
from danlu.optimizers.muon import Muon
from danlu.optimizers.nadam import NAdam
from danlu.optimizers.radam import RAdam
from danlu.optimizers.rmsprop import RMSprop
from danlu.optimizers.sgd import SGD

__all__ = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "NAdam", "RAdam", "Adafactor", "Lion", "Adamax", "LazyAdam", "Muon"]
