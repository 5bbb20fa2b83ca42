"""Gradient agreement for learn2learn's ``MAML`` / ``MetaSGD`` loops, and Reptile.

A stock learn2learn loop changes in four lines::

    maml = l2l.algorithms.MAML(model, lr=0.5, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    agree = AgreementMAML(maml, opt)                       # + wrap
    for iteration in range(iterations):
        opt.zero_grad()
        for task in range(meta_batch_size):
            learner = maml.clone()
            learner.adapt(support_loss(learner))
            agree.backward(query_loss(learner), learner)    # was: query_loss.backward()
        agree.step()                                        # was: p.grad /= N; opt.step()

Needs learn2learn 0.2.0: ``pip install learn2learn==0.2.0`` on Python 3.10; on 3.11 and later
its sdist must be rebuilt (the commands are in the installation guide).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._aggregator import NonFinitePolicy, Reduction
from .._weightings import Weighting
from ._recorder import AgreementOn, MetaGradientRecorder
from .reptile import AgreementReptile

try:
    _stderr = io.StringIO()
    with contextlib.redirect_stderr(_stderr):  # gym prints a banner when learn2learn loads it
        import learn2learn as l2l
    sys.stderr.write(
        "".join(line for line in _stderr.getvalue().splitlines(True) if "gym" not in line.lower())
    )
except ImportError as error:  # pragma: no cover - exercised only without learn2learn
    raise ImportError(
        "ga_optim.adapters.learn2learn needs learn2learn 0.2.0, which ships only as an "
        "sdist. On Python 3.10: pip install learn2learn==0.2.0 (it compiles). On Python "
        "3.11 and later its generated C files no longer compile: regenerate them with "
        "Cython 3.0 and install it into this environment with the five commands of "
        "ga_optim's installation guide (docs/site/install.md, 'learn2learn'); in a ga_optim "
        "checkout, bash scripts/install_learn2learn.sh does it for .venv."
    ) from error

__all__ = ["AgreementMAML", "AgreementReptile"]


class AgreementMAML(MetaGradientRecorder):
    r"""Wrap a learn2learn ``MAML`` or ``MetaSGD`` so its outer step uses gradient agreement.

    Algorithm 1, lines 7–9, of Eshratifar, Eigen & Pedram (2018): each task's inner-loop
    delta :math:`g_i = \theta - \theta_i` gives the weights (Eq. 13), and the outer step is
    :math:`\theta \leftarrow \theta - \alpha \sum_i w_i \nabla_\theta L_i(\theta_i)` through
    ``optimizer``. First and second order both work: the meta-gradient is whatever
    learn2learn's graph gives (for ``first_order=True``, the gradient at θ_i). With
    :class:`~ga_optim.Mean`, the step equals the plain loop that averages the tasks'
    ``.grad`` and steps.

    Args:
        maml: an ``l2l.algorithms.MAML`` or ``l2l.algorithms.MetaSGD``.
        optimizer: the outer optimizer over ``maml.parameters()``, or ``None``:
            :meth:`step` then only writes ``.grad`` and the loop steps itself (gradient
            clipping, ``scaler.step(opt)`` under a ``torch.amp.GradScaler``).
        params: the outer parameters, when the loop steps them itself
            (``optimizer=None``) and they are more than the wrapped model's (ANIL's
            features outside the MAML-wrapped head); default: every parameter
            ``optimizer`` holds, or without one the wrapped model's. Each task's
            meta-gradient covers all of them.
        weighting: a :class:`~ga_optim.Weighting`; default :class:`~ga_optim.Agreement`.
        agreement_on: ``"deltas"`` (the paper: the adapted parameters' inner-loop deltas)
            or ``"meta_gradients"`` (every outer parameter's meta-gradient).
        reduction: ``"mean"`` (default) or ``"sum"``: with :class:`~ga_optim.Mean`, the
            tasks' average or their sum, as the loop it replaces averages or sums the
            tasks' losses (see :class:`~ga_optim.GradientAgreementAggregator`).
        track_cosines: record each task's cosine with the mean agreement vector in
            :attr:`last_diagnostics` (one more pass over the vectors).
        non_finite: ``"raise"`` (default) or ``"propagate"``: let NaN/Inf meta-gradients
            reach ``.grad`` for a ``torch.amp.GradScaler`` to skip the step (needs
            ``optimizer=None``; see :class:`~ga_optim.GradientAgreementAggregator`).
        process_group: ``None`` (one process) or a ``torch.distributed`` process group over
            which the meta-batch is spread: each rank records its own tasks and every rank
            calls :meth:`step` (see :class:`~ga_optim.GradientAgreementAggregator`).
    """

    def __init__(
        self,
        maml: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        params: Iterable[Tensor] | None = None,
        weighting: Weighting | None = None,
        agreement_on: AgreementOn = "deltas",
        reduction: Reduction = "mean",
        track_cosines: bool = False,
        non_finite: NonFinitePolicy = "raise",
        process_group: Any = None,
    ) -> None:
        if not isinstance(maml, (l2l.algorithms.MAML, l2l.algorithms.MetaSGD)):
            raise TypeError(
                "`maml` should be a learn2learn MAML or MetaSGD. "
                f"Found `{type(maml).__name__}`; for plain modules use AgreementReptile."
            )
        self.maml = maml
        super().__init__(
            maml.parameters(),
            optimizer,
            params=params,
            weighting=weighting,
            agreement_on=agreement_on,
            reduction=reduction,
            track_cosines=track_cosines,
            non_finite=non_finite,
            process_group=process_group,
        )

    def clone(self, **kwargs: Any) -> nn.Module:
        """Exactly ``maml.clone(**kwargs)``: adapt it with ``learner.adapt(loss)``."""
        return self.maml.clone(**kwargs)  # type: ignore[no-any-return]

    def backward(self, loss: Tensor, learner: nn.Module) -> None:
        """Replace ``loss.backward()``: record the task's meta-gradient and θ − θ_i."""
        if not isinstance(learner, type(self.maml)):
            raise TypeError(
                f"`learner` should be a clone of the wrapped {type(self.maml).__name__}. "
                f"Found `{type(learner).__name__}`."
            )
        adapted = list(learner.module.parameters())
        if isinstance(learner, l2l.algorithms.MetaSGD):
            # A MetaSGD clone's learning rates are plain tensors, not parameters; the inner
            # loop does not change them, so their delta is zero.
            adapted += list(learner.lrs)
        self.record_task(loss, adapted)
