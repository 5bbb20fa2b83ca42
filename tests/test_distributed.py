"""The aggregator over a real gloo process group equals one process over all the tasks.

World sizes 1, 2 and 3 with even, uneven and empty splits; every built-in weighting and a
Gramian-only one; the Reptile and MAML forms; float32 and float64. Ranks are real
processes on loopback (see tests/_distributed.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import _distributed_cases as cases
from tests._distributed import run_ranks, unwrap
from tests._examples import EXAMPLES
from tests._optional import require

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda w: f"world{w}")
def world_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[Any]]:
    world = request.param
    folder = tmp_path_factory.mktemp(f"world{world}")
    results, codes = run_ranks(cases.cases_worker, world, folder)
    unwrap(results)
    assert codes == [0] * world
    return world, results


def _assert_same_on_every_rank(results: list[Any], key: Any) -> None:
    first = results[0][key]
    for rank, result in enumerate(results[1:], start=1):
        other = result[key]
        for a, b in zip(first["weights"], other["weights"]):
            assert torch.equal(a, b), f"rank {rank}: weights differ from rank 0"
        for a, b in zip(first["params"], other["params"]):
            assert torch.equal(a, b), f"rank {rank}: parameters not bitwise equal to rank 0's"
        for a, b in zip(first["momentum"], other["momentum"]):
            assert torch.equal(a, b), f"rank {rank}: optimizer state differs"
        for a, b in zip(first["aggregate"], other["aggregate"]):
            assert torch.equal(a, b)
        assert torch.equal(first["plain_weights"], other["plain_weights"])


def test_distributed_equals_one_process(world_results: tuple[int, list[Any]]) -> None:
    world, results = world_results
    for key in cases.cases(world):
        name, form, dtype, split = key
        counts = cases.SPLITS[world][split]
        _assert_same_on_every_rank(results, key)
        got = results[0][key]
        expected = cases.run_case(name, form, dtype, counts, None, None)
        where = f"{key} counts={counts}"
        for a in got["weights"]:
            assert a.shape == (sum(counts),), where
        for field in ("weights", "params", "momentum", "aggregate", "cosines"):
            for a, b in zip(got[field], expected[field], strict=True):
                _close(a, b, dtype, f"{where}: {field}")
        _close(got["plain_weights"], expected["plain_weights"], dtype, f"{where}: weights()")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: str, where: str) -> None:
    torch.testing.assert_close(a, b, **TOLERANCE[dtype], msg=lambda m: f"{where}: {m}")


def test_mean_is_plain_averaging_across_ranks(world_results: tuple[int, list[Any]]) -> None:
    world, results = world_results
    for split, counts in cases.SPLITS[world].items():
        n = sum(counts)
        vectors, _ = cases.make_tasks(2, n, torch.float64)
        got = results[0][("mean", "reptile", "float64", split)]["aggregate"]
        for p, shape in enumerate(cases.SHAPES):
            total = sum(
                (t[p] for t in vectors if t[p] is not None), torch.zeros(shape, dtype=torch.float64)
            )
            torch.testing.assert_close(got[p], total / n, rtol=1e-12, atol=1e-14)


def test_what_crosses_the_wire(world_results: tuple[int, list[Any]]) -> None:
    """Exact payload bytes per step: Mean sends the update (P floats), Agreement the task sum
    and the update (2 P) and the N scores, a Gramian weighting every task's vector; each
    beside the small validation table. (The cases track cosines too: one max, one more
    P-sized sum and 2 N floats.) A world of one still runs its collectives."""
    world, results = world_results
    p8 = 8 * sum(torch.Size(s).numel() for s in cases.SHAPES)  # P float64s
    control = 8 * world * (3 + 3 * len(cases.SHAPES))  # the int64 validation table
    for split, counts in cases.SPLITS[world].items():
        n8 = 8 * max(counts)  # gathers pad every rank's block to the largest
        cosines = 8 + p8 + 2 * n8
        for rank, result in enumerate(results):
            sent = {
                name: result[(name, "reptile", "float64", split)]["bytes"][0]
                for name in ("mean", "agreement", "leave_one_out", "gramian")
            }
            assert sent["mean"] == control + p8 + cosines, (rank, split, sent)
            assert sent["agreement"] == control + 2 * p8 + n8 + cosines, (rank, split, sent)
            # the self-excluded scores: one more float, the largest entry
            assert sent["leave_one_out"] == control + 8 + 2 * p8 + n8 + cosines, (rank, split)
            assert sent["gramian"] == control + p8 * max(counts) + p8 + cosines, (rank, split)


def test_bad_input_on_one_rank_raises_on_every_rank(tmp_path: Path) -> None:
    world = 3
    results, codes = run_ranks(cases.errors_worker, world, tmp_path)
    unwrap(results)
    assert codes == [0] * world
    expected = {
        "nan_on_rank1": ("NonFiniteError", ["On rank 1 of 3", "`task_vectors[0][2]`", "nan"]),
        "ragged_on_last": ("ValueError", ["On rank 2 of 3", "`task_vectors[1][0]`", "(3, 4)"]),
        "dtype_on_rank0": ("TypeError", ["rank 0", "torch.float64", "torch.float32"]),
        "inf_agreement_mean": (
            "NonFiniteError",
            ["On rank 0 of 3", "`agreement_vectors[1][0]`", "inf"],
        ),
        "no_task_anywhere": ("ValueError", ["no task on any of the 3 ranks"]),
        "form_mismatch": ("ValueError", ["Ranks [0] passed `agreement_vectors`"]),
        "overflow": ("ValueError", ["overflowed"]),
        "gramian_on_rank1": ("ValueError", ["On rank 1 of 3", "`gramian` cannot be given"]),
    }
    for call, (kind, fragments) in expected.items():
        for rank, result in enumerate(results):
            record = result[call]
            assert record["raised"] is not None, f"{call}: rank {rank} did not raise"
            got_kind, message = record["raised"]
            assert got_kind == kind, (call, rank, record)
            for fragment in fragments:
                assert fragment in message, (call, rank, message)
            assert record["unchanged"], f"{call}: rank {rank} wrote something before raising"
        messages = {result[call]["raised"][1] for result in results}
        assert len(messages) == 1, f"{call}: ranks raised different messages {messages}"
    # The group is still in step: a good call afterwards works and agrees everywhere.
    for result in results[1:]:
        assert torch.equal(result["good"], results[0]["good"])
        for a, b in zip(result["params"], results[0]["params"]):
            assert torch.equal(a, b)
    vectors, _ = cases.make_tasks(5, 2 * world, torch.float32)
    reference = cases.weighting("agreement").weights(vectors)
    torch.testing.assert_close(results[0]["good"], reference, rtol=1e-5, atol=1e-6)
    # non_finite="propagate": every rank gets NaN weights and non-finite .grad, no raise.
    for result in results:
        assert torch.isnan(result["propagate"]["weights"]).all()
        assert result["propagate"]["weights"].shape == (2 * world,)
        assert not any(result["propagate"]["grads_finite"])
    # Without a process_group, each rank weighs only its own two tasks.
    for rank, result in enumerate(results):
        alone = cases.weighting("agreement").weights(vectors[2 * rank : 2 * rank + 2])
        torch.testing.assert_close(result["local"], alone)


def test_a_dead_rank_makes_the_others_raise_not_hang(tmp_path: Path) -> None:
    results, codes = run_ranks(cases.dying_worker, 2, tmp_path, deadline_s=120.0, pg_timeout_s=10.0)
    assert codes[1] == 3
    assert codes[0] == 0, results[0]
    survivor = unwrap([results[0]])[0]
    assert survivor["raised"] is not None, "the survivor's step returned without its peer"
    kind, is_runtime_error, message = survivor["raised"]
    assert is_runtime_error, (kind, message)
    assert survivor["elapsed"] < 10.0 + 20.0


def test_process_group_is_validated() -> None:
    from ga_optim import GradientAgreementAggregator

    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"torch\.distributed is not initialised"):
        GradientAgreementAggregator(params, process_group=object())


@pytest.mark.parametrize("counts", [[1, 3], [0, 2, 2]], ids=["uneven", "empty-rank"])
def test_adapters_across_ranks_equal_one_process(counts: list[int], tmp_path: Path) -> None:
    require("learn2learn", "bash scripts/install_learn2learn.sh")
    require("higher", "pip install higher==0.2.1")
    results, codes = run_ranks(cases.adapters_worker, len(counts), tmp_path, counts)
    unwrap(results)
    assert codes == [0] * len(counts)
    for kind in cases.ADAPTERS:
        expected = cases.run_adapter(kind, counts, None, None)
        initial = [p.detach() for p in cases.sine_model().parameters()]
        moved = max(float((e - i).abs().max()) for e, i in zip(expected, initial))
        assert moved > 1e-3, f"{kind}: the reference did not train"
        for rank, result in enumerate(results):
            for got, want, first in zip(result[kind], expected, results[0][kind]):
                assert torch.equal(got, first), f"{kind}: rank {rank} differs from rank 0"
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _run_example(launcher: list[str], out: Path) -> str:
    """Run examples/distributed_maml.py --quick (agreement) with ``launcher``; its stdout."""
    script = str(EXAMPLES / "distributed_maml.py")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, script, "--quick", "--weighting", "agreement", "--save", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_example_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    require("learn2learn", "bash scripts/install_learn2learn.sh")
    two = _run_example([*TORCHRUN, "--nproc_per_node", "2"], tmp_path / "two.pt")
    _run_example([sys.executable], tmp_path / "one.pt")
    assert "ranks 2, weighting agreement" in two
    before, after = map(float, re.findall(r"before ([\d.]+), after ([\d.]+)", two)[0])
    assert after < before, two
    for a, b in zip(torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_cuda_tensors_across_ranks_equal_one_process_on_the_cpu(tmp_path: Path) -> None:
    results, codes = run_ranks(cases.cuda_worker, 2, tmp_path)
    unwrap(results)
    assert codes == [0, 0]
    for (name, form), got in results[0].items():
        _assert_same_on_every_rank(results, (name, form))
        expected = cases.run_case(name, form, "float64", [3, 2], None, None)
        for field in ("weights", "params", "aggregate"):
            for a, b in zip(got[field], expected[field], strict=True):
                torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
