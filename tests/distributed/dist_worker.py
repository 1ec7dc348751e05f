"""One rank of the 2-process CPU (gloo) checks in ``test_distributed.py``; launched with torchrun's variables.

``python dist_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set. Every rank runs the
distributed calibration paths; rank 0 also runs the same paths at world size 1 in this process
(``ShardedCalibration(local=True)``, same threads), so the test can compare bit for bit. Each rank saves
``rank{r}.pt``; the test does the comparing.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from lowbit.calibration.distributed import ShardedCalibration, init_from_env  # noqa: E402
from lowbit.calibration.sequential import capture_block_inputs, quantize_sequential  # noqa: E402
from lowbit.formats.affine import IntAffine  # noqa: E402
from lowbit.methods.awq.api import AWQConfig  # noqa: E402
from lowbit.methods.gptq.api import GPTQConfig  # noqa: E402
from lowbit.model.blocks import find_blocks  # noqa: E402
from lowbit.train.toy import tiny_llama  # noqa: E402

ALL_STATS = ("hessian", "act_absmax", "act_mean_abs", "act_sq_mean")


class Recording(ShardedCalibration):
    """Keeps every reduced statistic the runner receives, to compare them, not only the rounded weights."""

    def __init__(self, *, local: bool = False) -> None:
        super().__init__(local=local)
        self.seen: list[dict[str, dict[str, torch.Tensor]]] = []

    def collect(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().collect(*args, **kwargs)
        self.seen.append({n: {k: v.clone() for k, v in st.items()} for n, st in out.items()})
        return out


def model() -> torch.nn.Module:
    # 10 samples in batches of 2: 5 batches, so rank 0 owns 2 and rank 1 owns 3 (uneven, not a power of 2)
    return tiny_llama(hidden_size=64, intermediate_size=128, num_layers=2, seed=0)


def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (10, 24), generator=torch.Generator().manual_seed(1))


def run_method(cfg: object, local: bool) -> dict[str, object]:
    shards = Recording(local=local)
    m = quantize_sequential(model(), cfg, calibration(), batch_size=2, distributed=shards)  # type: ignore[arg-type]
    return {"state": {k: v.clone() for k, v in m.state_dict().items()}, "stats": shards.seen}


def block_stats(local: bool) -> dict[str, dict[str, torch.Tensor]]:
    """All four input statistics of block 0's q/gate/down projections, reduced over the ranks."""
    m = model()
    shards = ShardedCalibration(local=local)
    own = shards.shard(calibration(), 2)
    block = find_blocks(m)[1][0]
    calls = capture_block_inputs(m, block, own, 2)
    layers = {n: block.get_submodule(n) for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")}
    with torch.no_grad():
        return shards.collect_block(block, layers, ALL_STATS, calls, stop_early=False)


def fisher(local: bool) -> dict[str, torch.Tensor]:
    m = model()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    return ShardedCalibration(local=local).fisher(m, calibration()[:5], names)


def main() -> None:
    out_dir = sys.argv[1]
    assert init_from_env(), "expected torchrun's environment with WORLD_SIZE > 1"
    rank = dist.get_rank()
    gptq = GPTQConfig(format=IntAffine(bits=3, group_size=32), act_order=True)
    awq = AWQConfig(format=IntAffine(bits=3, group_size=32), n_grid=5, max_clip_tokens=64)
    res: dict[str, object] = {}
    for local in ([False, True] if rank == 0 else [False]):
        key = "ws1" if local else f"ws{dist.get_world_size()}"
        res[key] = {"gptq": run_method(gptq, local), "awq": run_method(awq, local),
                    "block_stats": block_stats(local), "fisher": fisher(local)}
    # the QLoRA run: FSDP2 over the same 2 ranks
    from lowbit.train.distributed import prepare_qlora, train_qlora, unsharded_lora_state

    blocks = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(2))
    for local in ([False, True] if rank == 0 else [False]):
        key = "ws1" if local else f"ws{dist.get_world_size()}"
        dd = False if local else None
        qm = prepare_qlora(copy.deepcopy(model()), r=4, alpha=8.0, seed=0, distributed=dd)
        base = {k: v.clone() for k, v in qm.named_buffers() if k.endswith(("qdata", "absmax", "scale"))}
        kinds = sorted({type(p).__name__ for p in qm.parameters()})
        run = train_qlora(qm, blocks, steps=5, batch_size=4, lr=5e-3, seed=0, distributed=dd)
        after = {k: v.clone() for k, v in qm.named_buffers() if k in base}
        lora = unsharded_lora_state(qm) if not local else {k: v.detach().clone() for k, v in qm.named_parameters()
                                                             if ".lora_" in k}
        res[key]["qlora"] = {"losses": run.losses, "base_before": base, "base_after": after,
                             "param_types": kinds, "lora": lora}
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
