"""Adapters that add gradient agreement to existing meta-learning loops.

Import the one that matches your loop; each imports its library only when imported:

* :mod:`ga_optim.adapters.learn2learn` — ``AgreementMAML`` (learn2learn ``MAML`` and
  ``MetaSGD``, first and second order) and ``AgreementReptile``;
* :mod:`ga_optim.adapters.reptile` — ``AgreementReptile`` for any ``nn.Module`` (no
  dependency);
* :mod:`ga_optim.adapters.higher` — ``AgreementHigher`` for ``higher.innerloop_ctx`` loops;
* :mod:`ga_optim.adapters.func` — helpers for ``torch.func`` loops (``vmap`` over tasks).
"""

__all__: list[str] = []
