"""What the agreement weights do to Reptile's outer step on sine tasks (docs/RESULTS.md).

Meta-trains θ with plain Reptile (the Mean weighting, the protocol of
examples/paper/sine_regression.py), then, at θ before and after training, draws meta-batches of
10 tasks and compares, for each weighting, the weights and the outer step Σ w_i g_i with
the Mean step (1/N) Σ g_i:

* effective number of tasks (Σ|w_i|)² / Σ w_i² (10 for Mean);
* share of |w| on the tasks of amplitude ≥ 3 (they are 41 % of tasks);
* Spearman correlation between |w_i| and the task's amplitude;
* share of negative weights;
* ‖Σ w_i g_i‖ / ‖(1/N) Σ g_i‖: how much longer the step is than Mean's at the same lr.

    PYTHONPATH=examples/paper .venv/bin/python docs/results/weight_diagnostics.py [iterations]
"""

from __future__ import annotations

import statistics
import sys

import torch
from sine_regression import Config, _per_task, adapt, init_mlp, sample_tasks, train

from ga_optim import Agreement, CosineAgreement, Mean, NonNegativeAgreement

WEIGHTINGS = {
    "mean": Mean(),
    "agreement": Agreement(),
    "nonnegative": NonNegativeAgreement(),
    "cosine": CosineAgreement(),
}


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def diagnose(theta: list[torch.Tensor], cfg: Config, batches: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in WEIGHTINGS}
    for _ in range(batches):
        amplitude, _, x, y = sample_tasks(cfg.meta_batch, cfg.inner_steps * cfg.inner_batch, gen)
        a = amplitude.view(-1).double()
        batched = [p.unsqueeze(0).expand(cfg.meta_batch, *p.shape) for p in theta]
        adapted = adapt(batched, x, y, cfg.inner_steps, cfg.inner_lr, cfg.inner_batch)
        deltas = [b - f for b, f in zip(batched, adapted)]
        flat = torch.cat([d.reshape(cfg.meta_batch, -1) for d in deltas], dim=1).double()
        mean_step = flat.mean(0).norm()
        for name, weighting in WEIGHTINGS.items():
            w = weighting.weights(_per_task(deltas)).double()
            stats = rows[name]
            stats.setdefault("effective tasks", []).append(float(w.abs().sum() ** 2 / (w**2).sum()))
            stats.setdefault("share of Σ abs(w) on a ≥ 3", []).append(
                float(w.abs()[a >= 3].sum() / w.abs().sum())
            )
            rank_w, rank_a = _ranks(w.abs()), _ranks(a)
            corr = torch.corrcoef(torch.stack([rank_w, rank_a]))[0, 1]
            stats.setdefault("Spearman(abs(w), a)", []).append(float(corr.nan_to_num(0.0)))
            stats.setdefault("share negative", []).append(float((w < 0).double().mean()))
            step = (w.unsqueeze(1) * flat).sum(0).norm()
            stats.setdefault("step / Mean step", []).append(float(step / mean_step))
    return {name: {k: statistics.fmean(v) for k, v in s.items()} for name, s in rows.items()}


def main(iterations: int) -> None:
    torch.set_num_threads(1)
    cfg = Config.for_algorithm("reptile", iterations=iterations)
    before = init_mlp(torch.Generator().manual_seed(0))
    after, _ = train("mean", 0, cfg)
    states = (("θ at initialisation", before), (f"θ after {iterations} Mean its", after))
    for label, theta in states:
        table = diagnose(theta, cfg, batches=300, seed=7)
        columns = list(next(iter(table.values())))
        print(f"\n| {label} | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for name, stats in table.items():
            print(f"| {name} | " + " | ".join(f"{stats[c]:.2f}" for c in columns) + " |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
