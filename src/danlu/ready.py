"""Ready-made derived optimizers: AdamW, Lamb and Ranger (LazyAdam is in ``danlu.optimizers``)."""

from __future__ import annotations

from danlu.derive import extend_with_layer_adaptation, extend_with_lookahead, extend_with_weight_decay
from danlu.optimizers import Adam, RAdam

__all__ = ["AdamW", "Lamb", "Ranger"]

AdamW = extend_with_weight_decay(Adam, name="AdamW")
AdamW.__doc__ = r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019): ``extend_with_weight_decay(Adam)``.

.. math::

    \theta_t = \theta_{t-1} - \eta_t \Big(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\, \theta_{t-1}\Big)

Arguments: those of :class:`danlu.Adam` plus ``weight_decay_rate=0.01`` and
``exclude_from_weight_decay=()``. Equal to ``torch.optim.AdamW`` with ``weight_decay=weight_decay_rate``.

Example:
    >>> import torch, danlu
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = danlu.AdamW(model.named_parameters(), lr=1e-3, weight_decay_rate=0.01, exclude_from_weight_decay=["bias"])
"""

Lamb = extend_with_layer_adaptation(extend_with_weight_decay(Adam), name="Lamb")
Lamb.__doc__ = r"""LAMB (You et al., 2020): ``extend_with_layer_adaptation(extend_with_weight_decay(Adam))``.

With :math:`d = -\eta_t (\hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda \theta_{t-1})`:

.. math::

    \theta_t = \theta_{t-1} + \frac{\lVert\theta_{t-1}\rVert}{\lVert d / \max(\eta_t, 10^{-7})\rVert}\, d

(trust ratio 1 where either norm is 0). Equal to ``optax.lamb`` whenever :math:`\eta_t \ge 10^{-7}`.
Arguments: those of :class:`danlu.Adam` plus ``weight_decay_rate=0.01``, ``exclude_from_weight_decay=()``
and ``exclude_from_layer_adaptation=()``.

Example:
    >>> import torch, danlu
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = danlu.Lamb(model.named_parameters(), lr=1e-3, exclude_from_weight_decay=["bias"])
"""

Ranger = extend_with_lookahead(RAdam, name="Ranger")
Ranger.__doc__ = r"""Ranger (Wright, 2019): Lookahead over RAdam, ``extend_with_lookahead(RAdam)``.

Arguments: those of :class:`danlu.RAdam` plus ``steps_per_slow_update=5`` and ``slow_step_size=0.5``.

Example:
    >>> import torch, danlu
    >>> opt = danlu.Ranger([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
"""
