"""Calibration and QLoRA over 2 CPU processes (gloo), against the same code at world size 1.

One module-scoped launch of ``dist_worker.py`` on 2 ranks (torchrun's environment variables, so the
``init_from_env`` path that ``torchrun`` and the CLI use is the one tested); the comparisons happen here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lowbit.calibration.distributed import TreeSum, tree_nodes

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(script: Path, args: list[str], world_size: int, timeout: float = 300) -> None:
    """Run ``script`` as ``world_size`` ranks with torchrun's variables; fail with every rank's output."""
    port = _free_port()
    procs = []
    for r in range(world_size):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate()[0] for p in procs]
        pytest.fail(f"ranks still running after {timeout}s:\n" +
                    "\n".join(f"--- rank {r}\n{o[-4000:]}" for r, o in enumerate(outs)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    if any(codes):
        pytest.fail(f"ranks exited with {codes}:\n" + "\n".join(f"--- rank {r}\n{o[-4000:]}" for r, o in enumerate(outs)))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    launch(WORKER, [str(out)], world_size=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` (nested dicts/lists of tensors) are not bit-identical."""
    if isinstance(a, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))
        return [] if same else [path]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


# -- the tree itself, no processes ----------------------------------------------------------------------

@pytest.mark.parametrize("n_leaves", [1, 5, 7, 8, 13])
def test_tree_sum_is_bit_identical_for_any_split_into_ranks(n_leaves: int) -> None:
    g = torch.Generator().manual_seed(n_leaves)
    # values of very different magnitudes, where fp32 addition order matters
    leaves = [torch.randn(257, generator=g) * 10.0 ** torch.randint(-4, 5, (257,), generator=g) for _ in range(n_leaves)]
    add = lambda a, b: a + b  # noqa: E731
    one = TreeSum(add)
    for x in leaves:
        one.push(x)
    ref = one.total()
    naive_differs = False
    for world in range(1, min(n_leaves, 5) + 1):
        ranges = [(r * n_leaves // world, (r + 1) * n_leaves // world) for r in range(world)]
        glob = TreeSum(add)
        partials = []
        for a, b in ranges:
            local = TreeSum(add, a)
            for x in leaves[a:b]:
                local.push(x)
            assert local.nodes() == tree_nodes(a, b)
            for (k, i), (_, _, v) in zip(local.nodes(), local.stack):
                glob.push_node(k, i, v)
            partials.append(sum(leaves[a:b][1:], leaves[a:b][0].clone()))
        assert torch.equal(glob.total(), ref), f"world size {world}"
        naive = partials[0]
        for p in partials[1:]:  # what an all-reduce of per-rank running sums would give
            naive = naive + p
        naive_differs |= not torch.equal(naive, ref)
    if n_leaves >= 7:  # the fixed tree is what makes the result independent of the split, not luck
        assert naive_differs


def test_tree_sum_refuses_out_of_order_subtrees() -> None:
    t = TreeSum(lambda a, b: a + b)
    t.push(torch.ones(1))
    with pytest.raises(ValueError, match="starts at leaf 4, expected leaf 1"):
        t.push_node(2, 1, torch.ones(1))


# -- 2 gloo ranks vs world size 1 ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_weights_and_statistics_bit_identical_to_one_process(ranks: list[dict[str, Any]],
                                                                       method: str) -> None:
    ws2, ws1 = ranks[0]["ws2"][method], ranks[0]["ws1"][method]
    stat = {"gptq": "hessian", "awq": "act_mean_abs"}[method]
    assert len(ws1["stats"]) >= 4 and all(stat in st for layer in ws1["stats"] for st in layer.values())
    assert differences(ws2["stats"], ws1["stats"]) == []
    assert differences(ws2["state"], ws1["state"]) == []
    # the run did quantize: packed codes, no float projection weights left
    assert any(k.endswith("qdata") for k in ws1["state"])
    assert not any(k.endswith("q_proj.weight") for k in ws1["state"])


def test_every_rank_ends_with_the_same_weights(ranks: list[dict[str, Any]]) -> None:
    for method in ("gptq", "awq"):
        assert differences(ranks[0]["ws2"][method]["state"], ranks[1]["ws2"][method]["state"]) == []


def test_activation_statistics_and_hessian_bit_identical(ranks: list[dict[str, Any]]) -> None:
    ws2, ws1 = ranks[0]["ws2"]["block_stats"], ranks[0]["ws1"]["block_stats"]
    assert differences(ws2, ws1) == []
    assert differences(ranks[1]["ws2"]["block_stats"], ws1) == []
    st = ws1["mlp.down_proj"]
    assert set(st) == {"hessian", "act_absmax", "act_mean_abs", "act_sq_mean"}
    # sanity of what was reduced: the Hessian's diagonal is 2·mean(x²), max|x| bounds mean|x|
    torch.testing.assert_close(st["hessian"].diagonal(), 2 * st["act_sq_mean"], rtol=1e-5, atol=1e-7)
    assert bool((st["act_absmax"] >= st["act_mean_abs"]).all()) and float(st["act_absmax"].max()) > 0


def test_fisher_bit_identical(ranks: list[dict[str, Any]]) -> None:
    ws2, ws1 = ranks[0]["ws2"]["fisher"], ranks[0]["ws1"]["fisher"]
    assert differences(ws2, ws1) == [] and differences(ranks[1]["ws2"]["fisher"], ws1) == []
    assert all(float(v.sum()) > 0 for v in ws1.values())


def test_qlora_fsdp2_loss_matches_one_process(ranks: list[dict[str, Any]]) -> None:
    ws2, ws1 = ranks[0]["ws2"]["qlora"], ranks[0]["ws1"]["qlora"]
    assert ws2["losses"] == ranks[1]["ws2"]["qlora"]["losses"]  # the reported loss is the mean over ranks
    # gradients are averaged over ranks instead of summed in one batch: equal up to fp32 rounding
    torch.testing.assert_close(torch.tensor(ws2["losses"]), torch.tensor(ws1["losses"]), rtol=0, atol=1e-5)
    assert ws1["losses"][-1] < ws1["losses"][0]  # the adapters train
    assert "DTensor" in ws2["param_types"] and "DTensor" not in ws1["param_types"]  # FSDP2 did shard
    for k, v in ws1["lora"].items():
        torch.testing.assert_close(ws2["lora"][k], v, rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in ws1["lora"].items() if "lora_B" in k)


def test_qlora_nf4_base_intact_under_fsdp2(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        q = rank["ws2"]["qlora"]
        assert any(k.endswith("qdata") and v.dtype == torch.uint8 for k, v in q["base_before"].items())
        # the packed base is neither sharded nor changed by training, and equals the one-process base
        assert differences(q["base_after"], q["base_before"]) == []
        assert differences(q["base_before"], ranks[0]["ws1"]["qlora"]["base_before"]) == []


# -- in-process checks (world size 1), no processes -------------------------------------------------------

def test_reduced_statistics_equal_float64_textbook_values() -> None:
    from lowbit.calibration.distributed import ShardedCalibration

    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 8)
    batches = [torch.randn(3, 5, 24) * 4 for _ in range(7)]
    shards = ShardedCalibration(local=True)
    shards.n_batches = len(batches)
    with torch.no_grad():
        got = shards.collect({"fc": lin}, ["hessian", "act_absmax", "act_mean_abs", "act_sq_mean"],
                             [lambda x=x: lin(x) for x in batches], stop_early=True)["fc"]
    X = torch.cat([x.reshape(-1, 24) for x in batches]).double()
    n = X.shape[0]
    want = {"hessian": 2.0 / n * X.T @ X, "act_absmax": X.abs().amax(0), "act_mean_abs": X.abs().mean(0),
            "act_sq_mean": X.square().mean(0)}
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-5, msg=k)
    assert torch.equal(got["act_absmax"].double(), want["act_absmax"])  # a max is exact


def test_too_few_batches_for_the_ranks_is_refused() -> None:
    from lowbit.calibration.distributed import ShardedCalibration

    shards = ShardedCalibration(local=True)
    shards.world_size = 3  # as if 3 ranks
    with pytest.raises(ValueError, match="4 calibration samples make 2 batches of 2, fewer than the 3 ranks"):
        shards.shard(torch.zeros(4, 8, dtype=torch.long), 2)


def test_bad_distributed_argument_is_refused() -> None:
    from lowbit.calibration.distributed import ShardedCalibration

    with pytest.raises(TypeError, match="distributed must be a ShardedCalibration, True, False or None"):
        ShardedCalibration.resolve("yes")  # type: ignore[arg-type]
    assert ShardedCalibration.resolve(False) is None
    assert ShardedCalibration.resolve(True).world_size == 1  # type: ignore[union-attr]
