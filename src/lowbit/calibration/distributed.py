"""Calibration spread over several processes (``torch.distributed``): same weights as one process, bit for bit.

The sequential runner (:func:`lowbit.calibration.sequential.quantize_sequential`) takes a
:class:`ShardedCalibration` (``distributed=``; found automatically under ``torchrun``). Then:

1. **Samples.** The calibration batches (``batch_size`` samples each, in order) are split into contiguous
   ranges, one per rank; each rank runs the model only on its own batches (block-0 capture, every statistics
   pass, the block outputs that feed the next block). Activation memory and forward time divide by N.
2. **Statistics.** Every statistic a method declares is a sum (or a max) over batches. Each rank adds up the
   contribution of each of its batches (a *leaf*: ``XᵀX``, ``Σ|x|``, ``Σx²``, ``max|x|`` over the batch's
   tokens, in fp32) in a **fixed binary tree over the global batch index** (pairwise summation, the tree's
   shape depends on the number of batches only). A rank owns complete subtrees of its range; the ranks
   broadcast those subtree sums in rank order and every rank finishes the same tree. Floating-point addition
   is not associative, but here every addition has the same two operands whatever the world size, so the
   result is bit-identical for N = 1, 2, 4, ... (an all-reduce of per-rank partial sums is not). The mean
   (``/n``, ``·2/n`` for the Hessian) is taken once at the end from the exact token count.
3. **Quantizing.** Every rank holds the same statistics; the layers of a true-sequential stage are dealt
   to the ranks (longest first), each rank quantizes its layers, and the owner broadcasts the quantized
   tensors (GPTQ's column sweeps of q/k/v or gate/up run in parallel; with ``true_sequential=False`` all
   seven layers of a block form one stage, so more of them do).
4. **Block transforms** (AWQ/SmoothQuant ``prepare_block``) search over all calibration batches, so before
   ``prepare_block`` every rank receives the block inputs of all batches (broadcast by their owners); the
   search itself is repeated on every rank (deterministic, so the edited weights agree). Its statistics are
   reduced like any other.
5. **Fisher** (SqueezeLLM): per-sample squared gradients (leaves) over the rank's samples, the same tree.

The one-process reference is the same code at world size 1 (``distributed=True`` without a process group):
it uses the same tree, so a 1-GPU and an N-GPU run agree bit for bit on the same device type. The default
runner (``distributed=None`` outside torchrun) keeps its running fp32 mean, which differs from the tree sum
only by rounding.

Launch: ``torchrun --nproc_per_node N -m lowbit.cli.main quantize ...`` (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowbit.calibration.hooks import StopForward, fisher_diagonal
from lowbit.calibration.sequential import BlockCall, identity_if_unseen, run_block, with_hidden
from lowbit.formats.base import QuantizedTensor
from lowbit.model.walk import set_submodule
from lowbit.nn.linear import QuantLinear

__all__ = ["ShardedCalibration", "TreeSum", "init_from_env", "tree_nodes"]

log = logging.getLogger(__name__)

Node = tuple[int, int]
"""``(level, index)``: the tree node covering leaves ``[index·2^level, (index+1)·2^level)``."""

Stats = dict[str, dict[str, torch.Tensor]]
"""``{layer name: {statistic name: tensor}}``."""


class TreeSum:
    """Pairwise reduction of leaves ``0, 1, 2, ...`` in a fixed binary tree, fed in order (a binary counter).

    A node is combined from its two children as soon as both exist, so memory is ``O(log n)`` values. Leaves
    (or whole subtrees, :meth:`push_node`) may start at any ``start``; pushing the subtree sums of several
    contiguous ranges one after the other gives exactly the values of pushing every leaf. :meth:`total`
    folds the remaining nodes right to left, which is the tree whose missing right children are empty.

    Args:
        combine: ``combine(left, right) -> value``; may update ``left`` in place.
        start: index of the first leaf.
    """

    def __init__(self, combine: Callable[[Any, Any], Any], start: int = 0) -> None:
        self.combine = combine
        self.next = start
        self.stack: list[tuple[int, int, Any]] = []

    def push(self, leaf: Any) -> None:
        """Add the next leaf."""
        self.push_node(0, self.next, leaf)

    def push_node(self, level: int, index: int, value: Any) -> None:
        """Add a complete subtree ``(level, index)``; it must start where the previous one ended."""
        if index << level != self.next:
            raise ValueError(f"node ({level}, {index}) starts at leaf {index << level}, expected leaf {self.next}")
        self.next = (index + 1) << level
        while index % 2 == 1 and self.stack and self.stack[-1][:2] == (level, index - 1):
            value = self.combine(self.stack.pop()[2], value)
            level, index = level + 1, index // 2
        self.stack.append((level, index, value))

    def nodes(self) -> list[Node]:
        return [(k, i) for k, i, _ in self.stack]

    def total(self) -> Any:
        """The root's value (``None`` if nothing was pushed)."""
        if not self.stack:
            return None
        acc = self.stack[-1][2]
        for _, _, v in reversed(self.stack[:-1]):
            acc = self.combine(v, acc)
        return acc


def tree_nodes(start: int, stop: int) -> list[Node]:
    """The subtrees that :class:`TreeSum` holds after leaves ``start .. stop-1`` (what a rank contributes)."""
    t = TreeSum(lambda a, b: None, start)
    for _ in range(start, stop):
        t.push(None)
    return t.nodes()


def _combine_stats(a: Stats, b: Stats) -> Stats:
    for layer, st in a.items():
        for name, v in st.items():
            if name == "act_absmax":
                torch.maximum(v, b[layer][name], out=v)
            else:
                v.add_(b[layer][name])
    return a


def _combine_sum(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for k, v in a.items():
        v.add_(b[k])
    return a


class _LeafSums:
    """One batch's contribution to a layer's statistics: sums (and a max) over its tokens, fp32."""

    def __init__(self, names: Sequence[str], in_features: int) -> None:
        self.names, self.in_features = tuple(names), in_features
        self.value: dict[str, torch.Tensor] | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        X = x.detach().reshape(-1, self.in_features).float()
        if X.shape[0] == 0:
            return
        part = {}
        for name in self.names:
            if name == "hessian":
                part[name] = X.T @ X
            elif name == "act_absmax":
                part[name] = X.abs().amax(0)
            elif name == "act_mean_abs":
                part[name] = X.abs().sum(0)
            else:  # act_sq_mean
                part[name] = X.square().sum(0)
        self.value = part if self.value is None else _combine_stats({"": self.value}, {"": part})[""]
        self.n += X.shape[0]

    def leaf(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.value is not None:
            return self.value
        n = self.in_features  # a layer this batch never reached (an MoE expert): adds nothing
        return {k: torch.zeros((n, n) if k == "hessian" else (n,), device=device) for k in self.names}


def init_from_env() -> bool:
    """Initialise the default process group from ``torchrun``'s environment if it asks for more than one
    process and none exists yet (NCCL with one GPU per local rank when CUDA is present, gloo otherwise).

    Returns:
        Whether a process group with more than one rank is active afterwards.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend)
    log.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


class ShardedCalibration:
    """The distributed side of the sequential runner: which batches are this rank's, and the reductions.

    Args:
        group: the process group (default: the default group; world size 1 if torch.distributed is not
            initialised, which gives the one-process reference with the same summation order).
        local: ignore torch.distributed even if initialised: this process alone, world size 1 (the
            one-process reference computed inside a distributed job).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, local: bool = False) -> None:
        self.active = not local and dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.n_batches = 0
        self.batch_size = 0
        self._all_calls: list[BlockCall] | None = None

    @classmethod
    def resolve(cls, distributed: "ShardedCalibration | bool | None") -> "ShardedCalibration | None":
        """``distributed=`` of the runner: an instance; True (always, world size 1 without a process group);
        False (never); None (when torch.distributed runs more than one process, initialising it from
        ``torchrun``'s environment if needed)."""
        if isinstance(distributed, ShardedCalibration):
            return distributed
        if distributed is True:
            return cls()
        if distributed is False:
            return None
        if distributed is not None:
            raise TypeError(f"distributed must be a ShardedCalibration, True, False or None, got {distributed!r}")
        return cls() if init_from_env() else None

    # -- samples ------------------------------------------------------------------------------------------

    def batch_range(self, rank: int) -> tuple[int, int]:
        """Global batch indices ``[start, stop)`` of ``rank`` (contiguous, sizes differ by at most one)."""
        return rank * self.n_batches // self.world_size, (rank + 1) * self.n_batches // self.world_size

    def shard(self, calibration: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's calibration samples: its contiguous range of ``batch_size``-sample batches."""
        n = calibration.shape[0]
        self.batch_size, self.n_batches = batch_size, -(-n // batch_size)
        if self.n_batches < self.world_size:
            raise ValueError(f"{n} calibration samples make {self.n_batches} batches of {batch_size}, fewer than "
                             f"the {self.world_size} ranks; use more samples or a smaller batch_size")
        a, b = self.batch_range(self.rank)
        log.info("rank %d: calibration batches %d..%d of %d", self.rank, a, b - 1, self.n_batches)
        return calibration[a * batch_size:b * batch_size]

    def keep_all_calls(self, calls: list[BlockCall]) -> None:
        """The block-0 calls of *all* batches (for methods whose ``prepare_block`` searches over all data)."""
        if len(calls) != self.n_batches:
            raise ValueError(f"expected {self.n_batches} block calls, got {len(calls)}")
        self._all_calls = calls

    def all_calls(self, calls: list[BlockCall]) -> list[BlockCall]:
        """Every batch's block call, with hidden states from the batch's owner (``calls``: this rank's)."""
        if self._all_calls is None:
            raise RuntimeError("keep_all_calls was not called before all_calls")
        if self.world_size == 1:
            self._all_calls = list(calls)
            return self._all_calls
        a, _ = self.batch_range(self.rank)
        out = []
        for r in range(self.world_size):
            for i in range(*self.batch_range(r)):
                ref = self._all_calls[i]
                h = _hidden(calls[i - a]).contiguous() if r == self.rank else torch.empty_like(_hidden(ref))
                self._broadcast(h, r)
                out.append(with_hidden(ref, h))
        self._all_calls = out
        return out

    # -- statistics ---------------------------------------------------------------------------------------

    def collect_block(self, block: nn.Module, layers: Mapping[str, nn.Module], names: Sequence[str],
                      calls: list[BlockCall], stop_early: bool) -> Stats:
        """The runner's ``_collect`` over this rank's ``calls``, reduced over all ranks (see module doc)."""
        return self.collect(layers, names, [lambda c=c: run_block(block, c) for c in calls], stop_early)

    def collect_model(self, model: nn.Module, layers: Mapping[str, nn.Module], names: Sequence[str],
                      calibration: torch.Tensor, batch_size: int) -> Stats:
        """Statistics of ``layers`` over full forward passes on this rank's samples (``calibration``)."""
        dev = next(model.parameters()).device
        runs = [lambda ids=ids: model(ids.to(dev), use_cache=False) for ids in torch.split(calibration, batch_size)]
        return self.collect(layers, names, runs, stop_early=True)

    def collect(self, layers: Mapping[str, nn.Module], names: Sequence[str], runs: Sequence[Callable[[], Any]],
                stop_early: bool) -> Stats:
        """Run each of this rank's batches (``runs``, in batch order) with hooks on ``layers``; reduce.

        Returns the finished statistics (means, ``2/n·Σxᵀx``), identical on every rank.
        """
        start, stop = self.batch_range(self.rank)
        if len(runs) != stop - start:
            raise ValueError(f"rank {self.rank} owns batches {start}..{stop - 1} but got {len(runs)} runs")
        tree = TreeSum(_combine_stats, start)
        counts = dict.fromkeys(layers, 0)
        for run in runs:
            leaf = {n: _LeafSums(names, int(m.in_features)) for n, m in layers.items()}  # type: ignore[arg-type]
            fired: set[str] = set()

            def make_hook(n: str) -> Callable[..., None]:
                def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                    leaf[n].update(args[0])
                    if stop_early:
                        fired.add(n)
                        if len(fired) == len(leaf):
                            raise StopForward
                return hook

            handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
            try:
                run()
            except StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
            tree.push({n: leaf[n].leaf(_device(layers[n])) for n in layers})
            for n in layers:
                counts[n] += leaf[n].n
        sums = self._finish_tree(tree, stop)
        n_tok = self._sum_counts([counts[n] for n in layers], _device(next(iter(layers.values()))))
        out: Stats = {}
        for (name, st), n in zip(sums.items(), n_tok):
            res = {}
            for k, v in st.items():
                res[k] = v if k == "act_absmax" else v * ((2.0 if k == "hessian" else 1.0) / max(n, 1))
            out[name] = identity_if_unseen(name, n, res)
        return out

    def fisher(self, model: nn.Module, calibration: torch.Tensor, layer_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Empirical Fisher diagonal as :func:`~lowbit.calibration.hooks.fisher_diagonal` with ``batch_size=1``,
        with the samples split over ranks and the per-sample squared gradients summed in the fixed tree."""
        n = calibration.shape[0]
        if n < self.world_size:
            raise ValueError(f"{n} calibration samples for the Fisher, fewer than the {self.world_size} ranks")
        start, stop = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        tree = TreeSum(_combine_sum, start)
        for i in range(start, stop):
            tree.push(fisher_diagonal(model, calibration[i:i + 1], layer_names, batch_size=1))
        ranges = [(r * n // self.world_size, (r + 1) * n // self.world_size) for r in range(self.world_size)]
        total = self._reduce_tree(tree, ranges, _combine_sum)
        return {k: v * (1.0 / n) for k, v in total.items()}

    def _finish_tree(self, tree: TreeSum, stop: int) -> Stats:
        if tree.next != stop:
            raise RuntimeError(f"rank {self.rank}: tree ends at leaf {tree.next}, expected {stop}")
        ranges = [self.batch_range(r) for r in range(self.world_size)]
        return self._reduce_tree(tree, ranges, _combine_stats)

    def _reduce_tree(self, tree: TreeSum, ranges: Sequence[tuple[int, int]], combine: Callable[[Any, Any], Any]) -> Any:
        """Finish the tree from every rank's subtrees, received in rank order (the same on every rank)."""
        if self.world_size == 1:
            return tree.total()
        if tree.nodes() != tree_nodes(*ranges[self.rank]):
            raise RuntimeError(f"rank {self.rank}: subtrees {tree.nodes()} differ from {tree_nodes(*ranges[self.rank])}")
        mine = dict(zip(tree.nodes(), (v for _, _, v in tree.stack)))
        template = next(iter(mine.values()))
        glob = TreeSum(combine, 0)
        for r in range(self.world_size):
            for node in tree_nodes(*ranges[r]):
                buf = _flatten(mine[node]) if r == self.rank else _empty_like_flat(template)
                self._broadcast(buf, r)
                glob.push_node(*node, _unflatten(buf, template))
        return glob.total()

    def _sum_counts(self, counts: list[int], device: torch.device) -> list[int]:
        if self.world_size == 1:
            return counts
        t = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(t, group=self.group)
        return [int(v) for v in t.tolist()]

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                       group=self.group)

    # -- quantizing ---------------------------------------------------------------------------------------

    def quantize_stage(self, block: nn.Module, stage_layers: Mapping[str, nn.Module], stats: Stats,
                       quantize_layer: Callable[[str, nn.Module, dict[str, torch.Tensor]], None]) -> None:
        """Deal the stage's layers to the ranks (longest first to the least loaded rank, the cost of a layer
        being its input width: GPTQ's sequential column loop); each rank quantizes its own (``quantize_layer``
        swaps the ``QuantLinear`` in), then every owner broadcasts its layers to the others."""
        names = list(stage_layers)
        owner, load = {}, [0] * self.world_size
        for n in sorted(names, key=lambda n: -int(getattr(stage_layers[n], "in_features", 1))):
            r = min(range(self.world_size), key=lambda r: (load[r], r))
            owner[n] = r
            load[r] += int(getattr(stage_layers[n], "in_features", 1))
        for n in names:
            if owner[n] == self.rank:
                quantize_layer(n, stage_layers[n], dict(stats[n]))
        if self.world_size == 1:
            return
        for n in names:
            self._share_layer(block, n, stage_layers[n], owner[n])

    def _share_layer(self, block: nn.Module, name: str, old: nn.Module, src: int) -> None:
        dev = _device(old)
        meta: list[Any] = [None]
        if src == self.rank:
            mod = block.get_submodule(name)
            if not isinstance(mod, QuantLinear):
                raise RuntimeError(f"{name} was not replaced by a QuantLinear on its owner rank {src}")
            q = mod.qweight
            meta = [(q.format, q.shape, q.dtype, [(k, tuple(v.shape), v.dtype) for k, v in q.data.items()],
                     None if mod.bias is None else (tuple(mod.bias.shape), mod.bias.dtype))]
        dist.broadcast_object_list(meta, src=self._global(src), group=self.group, device=dev if dev.type == "cuda" else None)
        fmt, shape, dtype, specs, bias_spec = meta[0]
        if src == self.rank:
            for k, _, _ in specs:
                self._broadcast(getattr(mod, k).contiguous(), src)
            if bias_spec is not None:
                self._broadcast(mod.bias.data.contiguous(), src)
            return
        data = {}
        for k, s, dt in specs:
            data[k] = torch.empty(s, dtype=dt, device=dev)
            self._broadcast(data[k], src)
        bias = None
        if bias_spec is not None:
            bias = torch.empty(bias_spec[0], dtype=bias_spec[1], device=dev)
            self._broadcast(bias, src)
        set_submodule(block, name, QuantLinear(QuantizedTensor(fmt, shape, dtype, data), bias))

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r


def _device(m: nn.Module) -> torch.device:
    p = next(iter(m.parameters()), None)
    if p is None:
        p = next(iter(m.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _hidden(call: BlockCall) -> torch.Tensor:
    return call.args[0] if call.args else call.kwargs["hidden_states"]


def _leaves(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    else:
        for k in sorted(value):
            yield from _leaves(value[k])


def _flatten(value: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in _leaves(value)])


def _empty_like_flat(template: Any) -> torch.Tensor:
    ts = list(_leaves(template))
    return torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=ts[0].device)


def _unflatten(buf: torch.Tensor, template: Any) -> Any:
    pos = 0

    def build(v: Any) -> Any:
        nonlocal pos
        if isinstance(v, torch.Tensor):
            out = buf[pos:pos + v.numel()].view(v.shape)
            pos += v.numel()
            return out
        return {k: build(v[k]) for k in sorted(v)}

    return build(template)
