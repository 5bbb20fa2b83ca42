"""The pipeline shapes of the conformance suite: each as its stock loop and its wrapped loop.

Every ``run_*`` function trains a float64 model from a seed for ``STEPS`` outer steps on
fixed tasks, either as the stock loop (``wrapped=False``: the shape of the upstream
example, written here, the tasks' losses back-propagated and the optimizer stepped) or
with the documented edits (``wrapped=True``: the adapter's ``backward``/``record`` and
``step``), and returns every tensor the optimizer holds plus the model's buffers, by name.
With ``Mean`` the two must end at the same values.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ga_optim import Mean, Weighting

Task = tuple[Tensor, Tensor, Tensor, Tensor]
State = dict[str, Tensor]
STEPS, N_TASKS, INNER_LR = 3, 4, 0.1


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).mean()


def sine_tasks(seed: int, n: int = N_TASKS, shots: int = 6) -> list[Task]:
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        a = torch.empty(1).uniform_(0.5, 3.0, generator=gen).double()
        b = torch.empty(1).uniform_(0.0, 3.0, generator=gen).double()
        xs = torch.empty(shots, 1).uniform_(-3, 3, generator=gen).double()
        xq = torch.empty(shots, 1).uniform_(-3, 3, generator=gen).double()
        tasks.append((xs, a * torch.sin(xs + b), xq, a * torch.sin(xq + b)))
    return tasks


def image_tasks(seed: int, n: int = N_TASKS, ways: int = 3) -> list[Task]:
    """Tiny 1-channel 8 × 8 images, ``ways`` classes, one shot each (support and query)."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        prototypes = torch.randn(ways, 1, 8, 8, generator=gen).double()
        xs = prototypes + 0.3 * torch.randn(ways, 1, 8, 8, generator=gen).double()
        xq = prototypes + 0.3 * torch.randn(ways, 1, 8, 8, generator=gen).double()
        labels = torch.arange(ways)
        tasks.append((xs, labels, xq, labels))
    return tasks


def batches(seed: int, kind: str = "sine", count: int = STEPS) -> list[list[Task]]:
    make = sine_tasks if kind == "sine" else image_tasks
    return [make(seed * 100 + step) for step in range(count)]


def mlp(seed: int, hidden: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def conv_bn(seed: int, ways: int = 3, running_stats: bool = True) -> nn.Sequential:
    """learn2learn's Omniglot CNN shape, small: conv → BatchNorm → ReLU → pool, twice."""
    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> list[nn.Module]:
        bn = nn.BatchNorm2d(cout, momentum=1.0 if not running_stats else 0.1)
        if not running_stats:
            bn = nn.BatchNorm2d(cout, momentum=1.0, track_running_stats=False)
        return [nn.Conv2d(cin, cout, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(1, 4), *block(4, 4), nn.Flatten(), nn.Linear(4 * 2 * 2, ways)
    ).double()


def state(optimizer: torch.optim.Optimizer, *modules: nn.Module) -> State:
    """Every tensor ``optimizer`` holds (by group and position) and the modules' buffers."""
    out = {
        f"group{g}.param{k}": p.detach().clone()
        for g, group in enumerate(optimizer.param_groups)
        for k, p in enumerate(group["params"])
    }
    for m, module in enumerate(modules):
        for name, buffer in module.named_buffers():
            out[f"module{m}.{name}"] = buffer.detach().clone()
    return out


def max_difference(a: State, b: State) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _mean_grads(params: list[Tensor], n: int) -> None:
    """The stock learn2learn examples' ``p.grad.mul_(1.0 / meta_batch_size)``."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(1.0 / n)


# -- learn2learn MAML shapes ------------------------------------------------------------


def run_l2l(
    wrapped: bool,
    weighting: Weighting | None = None,
    *,
    shape: str = "whole",
    first_order: bool = False,
    seed: int = 0,
    rank: tuple[int, int] | None = None,
    n_tasks: int = N_TASKS,
) -> tuple[State, Any]:
    """learn2learn's MAML loop (``maml_sine.py`` / ``anil_fc100.py`` /
    ``maml_omniglot.py`` shapes). ``shape``: ``whole`` (the whole model is the learner,
    Adam), ``metasgd``, ``anil`` (features outside the MAML-wrapped head, both in Adam),
    ``frozen`` (a frozen first layer, ``allow_nograd=True``, AdamW with weight decay),
    ``bn`` (a BatchNorm CNN), ``groups`` (two parameter groups with their own rates),
    ``penalty`` (an L2 penalty on the meta-parameters back-propagated by the loop),
    ``accumulate`` (two meta-batches per outer step). ``rank``: (this rank, world size)
    in a gloo process group: each rank runs its contiguous share of every meta-batch, the
    wrapped loop with ``process_group=WORLD``. ``n_tasks``: the first tasks of each
    meta-batch only."""
    import learn2learn as l2l

    from ga_optim.adapters.learn2learn import AgreementMAML

    weighting = weighting or Mean()
    features: nn.Module = nn.Identity()
    kind = "image" if shape == "bn" else "sine"
    lossfn: Callable[[Tensor, Tensor], Tensor] = (
        nn.functional.cross_entropy if kind == "image" else mse  # type: ignore[assignment]
    )
    if shape == "anil":
        torch.manual_seed(seed)
        features = nn.Sequential(nn.Linear(1, 8), nn.Tanh()).double()
        head = l2l.algorithms.MAML(nn.Linear(8, 1).double(), lr=INNER_LR, first_order=first_order)
        outer_params = [*features.parameters(), *head.parameters()]
        maml, opt = head, torch.optim.Adam(outer_params, lr=0.01)
    elif shape == "bn":
        model = conv_bn(seed)
        maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order)
        opt = torch.optim.Adam(maml.parameters(), lr=0.01)
    else:
        model = mlp(seed)
        if shape == "frozen":
            model[0].requires_grad_(False)
        if shape == "metasgd":
            maml = l2l.algorithms.MetaSGD(model, lr=INNER_LR, first_order=first_order)
        else:
            maml = l2l.algorithms.MAML(
                model, lr=INNER_LR, first_order=first_order, allow_nograd=shape == "frozen"
            )
        if shape == "frozen":
            opt = torch.optim.AdamW(maml.parameters(), lr=0.01, weight_decay=0.1)
        elif shape == "groups":
            opt = torch.optim.SGD(
                [
                    {"params": model[0].parameters(), "lr": 0.1},
                    {"params": model[2].parameters(), "lr": 0.01, "momentum": 0.9},
                ],
                lr=0.05,
            )
        else:
            opt = torch.optim.Adam(maml.parameters(), lr=0.01)
    agree = None
    if wrapped:  # accumulating: the loop steps after two meta-batches (optimizer=None)
        group = None
        if rank is not None:
            import torch.distributed as dist

            group = dist.group.WORLD
        agree = AgreementMAML(
            maml,
            None if shape == "accumulate" else opt,
            weighting=weighting,
            process_group=group,
        )
    held = [p for group in opt.param_groups for p in group["params"]]

    def meta_batch(tasks: list[Task]) -> None:
        tasks = tasks[:n_tasks]
        if rank is not None:
            share = len(tasks) // rank[1]
            tasks = tasks[rank[0] * share : (rank[0] + 1) * share]
        for xs, ys, xq, yq in tasks:
            learner = maml.clone()
            for _ in range(2):
                learner.adapt(lossfn(learner(features(xs)), ys))
            query = lossfn(learner(features(xq)), yq)
            if agree is not None:
                agree.backward(query, learner)
            else:
                query.backward()

    def penalty() -> None:
        if shape == "penalty":
            (1e-2 * sum(p.pow(2).sum() for p in held)).backward()  # type: ignore[union-attr]

    per_step = 2 if shape == "accumulate" else 1
    groups = batches(seed, kind, STEPS * per_step)
    for step in range(0, len(groups), per_step):
        opt.zero_grad()
        if agree is None:
            for tasks in groups[step : step + per_step]:
                meta_batch(tasks)
            _mean_grads(held, n_tasks)
            penalty()
            opt.step()
        elif shape == "accumulate":
            for tasks in groups[step : step + per_step]:
                meta_batch(tasks)
                agree.step()  # adds this meta-batch's update to .grad
            opt.step()
        else:
            meta_batch(groups[step])
            penalty()
            agree.step()
    return state(opt, maml, features), agree


# -- Reptile ----------------------------------------------------------------------------


def run_reptile(
    wrapped: bool,
    weighting: Weighting | None = None,
    *,
    shape: str = "whole",
    seed: int = 0,
    n_tasks: int = N_TASKS,
) -> tuple[State, Any]:
    """learn2learn's ``reptile_miniimagenet.py`` loop: a copy of the model adapted with its
    own optimizer per task, ``θ − θ_i`` averaged into ``.grad``, the outer optimizer
    steps. ``shape``: ``whole`` (SGD), ``frozen`` (a frozen first layer, AdamW with weight
    decay: the stock loop writes ``.grad`` only for trainable parameters), ``groups``
    (two parameter groups with their own rates, Adam)."""
    from ga_optim.adapters.reptile import AgreementReptile

    model = mlp(seed)
    if shape == "frozen":
        model[0].requires_grad_(False)
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=0.05, weight_decay=0.1
        )
    elif shape == "groups":
        opt = torch.optim.Adam(
            [
                {"params": model[0].parameters(), "lr": 0.05},
                {"params": model[2].parameters(), "lr": 0.01},
            ]
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reptile = AgreementReptile(model, opt, weighting=weighting or Mean()) if wrapped else None
    for tasks in batches(seed):
        support = [partial(_support_mse, xs=xs, ys=ys) for xs, ys, _, _ in tasks[:n_tasks]]
        reptile_iteration(model, opt, reptile, support, inner_lr=0.05, inner_steps=3)
    return state(opt, model), reptile


def _support_mse(learner: nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
    return mse(learner(xs), ys)


def reptile_iteration(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    reptile: Any,
    support_losses: list[Callable[[nn.Module], Tensor]],
    *,
    inner_lr: float,
    inner_steps: int,
) -> None:
    """One outer step of learn2learn's Reptile loop: stock (``reptile=None``: ``.grad``
    zeroed for the trainable parameters, θ − θ_i added per task, averaged, ``opt.step()``)
    or wrapped (``reptile.clone()`` / ``record`` / ``step``). Each task is its support
    loss of a learner, minimised by SGD over the learner's trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad()
    if reptile is None:
        for p in trainable:
            p.grad = torch.zeros_like(p)
    for support_loss in support_losses:
        learner = copy.deepcopy(model) if reptile is None else reptile.clone()
        inner = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], inner_lr)
        for _ in range(inner_steps):
            inner.zero_grad()
            support_loss(learner).backward()
            inner.step()
        if reptile is not None:
            reptile.record(learner)
            continue
        with torch.no_grad():
            for p, fast in zip(model.parameters(), learner.parameters()):
                if p.requires_grad:
                    p.grad.add_(p - fast)  # type: ignore[operator]
    if reptile is None:
        _mean_grads(trainable, len(support_losses))
        opt.step()
    else:
        reptile.step()


# -- higher: a loop that sums its tasks' losses -----------------------------------------


def run_higher(
    wrapped: bool, weighting: Weighting | None = None, *, seed: int = 0
) -> tuple[State, Any]:
    """higher's ``maml-omniglot.py`` loop: a BatchNorm CNN (no running statistics), each
    task's query loss back-propagated as it is — the tasks' losses are *summed* — and
    Adam steps. Wrapped: ``reduction="sum"`` keeps the sum."""
    import higher

    from ga_optim.adapters.higher import AgreementHigher

    model = conv_bn(seed, running_stats=False)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    agree = (
        AgreementHigher(model, meta_opt, weighting=weighting or Mean(), reduction="sum")
        if wrapped
        else None
    )
    for tasks in batches(seed, "image"):
        meta_opt.zero_grad()
        for xs, ys, xq, yq in tasks:
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                fmodel,
                diffopt,
            ):
                for _ in range(2):
                    diffopt.step(nn.functional.cross_entropy(fmodel(xs), ys))
                query = nn.functional.cross_entropy(fmodel(xq), yq)
                if agree is not None:
                    agree.backward(query, fmodel)
                else:
                    query.backward()
        if agree is not None:
            agree.step()
        else:
            meta_opt.step()
    return state(meta_opt, model), agree


# -- LoRA adapters from peft on a small GPT-2 -------------------------------------------


def token_tasks(seed: int, n: int = N_TASKS, vocab: int = 24, length: int = 8) -> list[Task]:
    """Each task a little language: token t is followed by t + k (mod ``vocab``)."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        k = int(torch.randint(1, vocab, (1,), generator=gen))
        start = torch.randint(0, vocab, (4, 1), generator=gen)
        seqs = (start + k * torch.arange(length)) % vocab
        tasks.append((seqs[:2], seqs[:2], seqs[2:], seqs[2:]))
    return tasks


def lora_gpt2(seed: int) -> nn.Module:
    """A 2-layer GPT-2 built from a config (nothing downloaded), LoRA on its attention."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=24, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    base = GPT2LMHeadModel(config).double()
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():  # LoRA's B starts at zero; start it off zero so A trains at once
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def run_lora(
    wrapped: bool, weighting: Weighting | None = None, *, algo: str = "maml", seed: int = 0
) -> tuple[State, Any]:
    """Only the LoRA adapters train; the frozen base is in AdamW (weight decay 0.1), as
    ``AdamW(model.parameters())`` puts it. ``algo``: learn2learn MAML (first order) or
    Reptile."""
    model = lora_gpt2(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def loss_of(learner: nn.Module, ids: Tensor) -> Tensor:
        return learner(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]

    trainable = [p for p in model.parameters() if p.requires_grad]
    agree: Any = None
    if algo == "maml":
        import learn2learn as l2l

        from ga_optim.adapters.learn2learn import AgreementMAML

        maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=True, allow_nograd=True)
        if wrapped:
            agree = AgreementMAML(maml, opt, weighting=weighting or Mean())
        for step in range(STEPS):
            opt.zero_grad()
            for xs, _, xq, _ in token_tasks(seed * 100 + step):
                learner = maml.clone()
                learner.adapt(loss_of(learner, xs))
                if agree is None:
                    loss_of(learner, xq).backward()
                else:
                    agree.backward(loss_of(learner, xq), learner)
            if agree is None:
                _mean_grads(trainable, N_TASKS)
                opt.step()
            else:
                agree.step()
        return state(opt), agree
    from ga_optim.adapters.reptile import AgreementReptile

    if wrapped:
        agree = AgreementReptile(model, opt, weighting=weighting or Mean())
    for step in range(STEPS):
        support = [partial(loss_of, ids=xs) for xs, _, _, _ in token_tasks(seed * 100 + step)]
        reptile_iteration(model, opt, agree, support, inner_lr=0.1, inner_steps=2)
    return state(opt), agree


# -- torch.func: the shape of functorch's maml-omniglot-transforms.py -------------------


def stacked(tasks: list[Task]) -> tuple[Tensor, ...]:
    return tuple(torch.stack([task[k] for task in tasks]) for k in range(4))


def run_func(
    wrapped: bool, weighting: Weighting | None = None, *, upstream: bool = False, seed: int = 0
) -> tuple[State, Any]:
    """torch.func's MAML example: a BatchNorm CNN (no running statistics), the inner loop
    by ``grad`` inside a ``vmap`` over tasks, Adam, the tasks' query losses *summed*.

    ``upstream=True`` is the example's own shape: the per-task loss closes over
    ``net.named_parameters()``, and ``vmap(loss_for_task)(...).sum().backward()``. The
    other is the restructured shape the wrap needs (the parameters an argument, the
    adapted parameters returned as an auxiliary output, ``vmap(grad(loss_for_task))``);
    its stock loop puts the sum of the per-task meta-gradients into ``.grad``. Wrapped:
    ``FuncAgreement(net, meta_opt, reduction="sum")`` and ``agree.step(meta_grads,
    agreement_vectors=reptile_deltas(params, adapted))``."""
    from torch.func import functional_call, grad, vmap

    from ga_optim.adapters.func import FuncAgreement, reptile_deltas

    net = conv_bn(seed, running_stats=False)
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    agree = None
    if wrapped:
        agree = FuncAgreement(net, meta_opt, weighting=weighting or Mean(), reduction="sum")

    def compute_loss(new_params: State, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(net, new_params, (x,)), y)

    def adapt(params: State, x_spt: Tensor, y_spt: Tensor) -> State:
        new_params = params
        for _ in range(2):
            grads = grad(compute_loss)(new_params, x_spt, y_spt)
            new_params = {k: new_params[k] - INNER_LR * g for k, g in grads.items()}
        return new_params

    def upstream_loss(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
        new_params = adapt(dict(net.named_parameters()), x_spt, y_spt)
        return compute_loss(new_params, x_qry, y_qry)

    def loss_for_task(
        params: State, x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor
    ) -> tuple[Tensor, State]:
        new_params = adapt(params, x_spt, y_spt)
        return compute_loss(new_params, x_qry, y_qry), new_params

    for tasks in batches(seed, "image"):
        meta_opt.zero_grad()
        x_spt, y_spt, x_qry, y_qry = stacked(tasks)
        if upstream:
            vmap(upstream_loss)(x_spt, y_spt, x_qry, y_qry).sum().backward()
            meta_opt.step()
            continue
        params = {k: v.detach() for k, v in net.named_parameters()}
        per_task = vmap(grad(loss_for_task, has_aux=True), in_dims=(None, 0, 0, 0, 0))
        meta_grads, adapted = per_task(params, x_spt, y_spt, x_qry, y_qry)
        if agree is not None:
            agree.step(meta_grads, agreement_vectors=reptile_deltas(params, adapted))
            continue
        for name, p in net.named_parameters():
            p.grad = meta_grads[name].sum(0)
        meta_opt.step()
    return state(meta_opt, net), agree


def anil_worker(rank: int, world_size: int, weighting: str) -> State:
    """One rank of the ANIL loop over a gloo process group (tests/_distributed.py)."""
    from ga_optim import Agreement

    chosen = Mean() if weighting == "mean" else Agreement()
    end, _ = run_l2l(True, chosen, shape="anil", seed=11, rank=(rank, world_size))
    return end


class OnlyFirst(Weighting):
    """All the weight on the meta-batch's first task: the wrapped loop must then end where
    the stock loop over that task alone ends (the weights are the ones used)."""

    needs = "scores"

    def from_scores(self, scores: Tensor) -> Tensor:
        weights = torch.zeros_like(scores)
        weights[0] = 1.0
        return weights


def held_only(end: State) -> State:
    """What the optimizer holds, without the buffers (which see every task's forward)."""
    return {k: v for k, v in end.items() if k.startswith("group")}


def run_func_anil(
    wrapped: bool, weighting: Weighting | None = None, *, seed: int = 0, n_tasks: int = N_TASKS
) -> tuple[State, Any]:
    """ANIL in torch.func: one module ``features → head``; the vmapped inner loop adapts
    the head's entries of the parameter dict alone and returns them, so ``adapted`` has no
    entry for the features (their delta is zero). Stock: the mean of the per-task
    meta-gradients into ``.grad``, Adam."""
    from torch.func import functional_call, grad, vmap

    from ga_optim.adapters.func import FuncAgreement, reptile_deltas

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    agree = FuncAgreement(net, opt, weighting=weighting or Mean()) if wrapped else None

    def loss(params: State, x: Tensor, y: Tensor) -> Tensor:
        return mse(functional_call(net, params, (x,)), y)

    def loss_for_task(
        params: State, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> tuple[Tensor, State]:
        head = {k: v for k, v in params.items() if k.startswith("2.")}
        for _ in range(2):
            g = grad(lambda h: loss({**params, **h}, xs, ys))(head)
            head = {k: head[k] - INNER_LR * g[k] for k in head}
        return loss({**params, **head}, xq, yq), head

    per_task = vmap(grad(loss_for_task, has_aux=True), in_dims=(None, 0, 0, 0, 0))
    for tasks in batches(seed):
        opt.zero_grad()
        params = {k: v.detach() for k, v in net.named_parameters()}
        meta_grads, adapted = per_task(params, *stacked(tasks[:n_tasks]))
        if agree is not None:
            agree.step(meta_grads, agreement_vectors=reptile_deltas(params, adapted))
            continue
        for name, p in net.named_parameters():
            p.grad = meta_grads[name].mean(0)
        opt.step()
    return state(opt, net), agree
