"""The sequential calibration runner on tiny random Llama / Mistral / Qwen2 models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import pytest
import torch
from conftest import FAMILIES, tiny_model
from torch import nn

from lowbit.calibration.hooks import collect_input_stats, fisher_diagonal
from lowbit.calibration.sequential import capture_block_inputs, quantize_sequential, run_block
from lowbit.calibration.stats import InputStats
from lowbit.formats.affine import IntAffine
from lowbit.methods.base import MethodConfig
from lowbit.model.blocks import find_blocks, linear_stages
from lowbit.nn.linear import QuantLinear

STATS = ("hessian", "act_absmax", "act_mean_abs", "act_sq_mean")


@dataclass(frozen=True)
class Recorder(MethodConfig):
    """RTN that records the statistics and the weight each layer was quantized with (test-only, unregistered)."""

    stats: ClassVar[tuple[str, ...]] = STATS
    format: Any = field(default_factory=lambda: IntAffine(bits=3, group_size=32))
    seen: dict = field(default_factory=dict, compare=False)

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> Any:
        self.seen[len(self.seen)] = ({k: v.clone() for k, v in (stats or {}).items()}, W.clone())
        return self.format.quantize(W)


def textbook_stats(X: torch.Tensor) -> dict[str, torch.Tensor]:
    X = X.reshape(-1, X.shape[-1]).double()
    n = X.shape[0]
    return {"hessian": 2 * X.T @ X / n, "act_absmax": X.abs().amax(0), "act_mean_abs": X.abs().mean(0),
            "act_sq_mean": X.square().mean(0)}


def layer_inputs(model: nn.Module, names: list[str], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].detach()))
          for n in names]
    with torch.no_grad():
        for ids in torch.split(calib, 4):  # the runner's default batch of 8 holds all 6; batching must not matter
            model(ids, use_cache=False)
    for h in hs:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for n, v in got.items()}


def test_input_stats_running_mean_matches_float64_textbook() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=gen) * torch.linspace(0.1, 5, 16)
    acc = InputStats(STATS, 16)
    for chunk in torch.split(X, [1, 50, 249]):
        acc.update(chunk)
    ref = textbook_stats(X)
    for k in STATS:
        torch.testing.assert_close(acc.result()[k].double(), ref[k], rtol=1e-5, atol=1e-5)


def test_input_stats_reject_unknown_names_and_widths() -> None:
    with pytest.raises(ValueError, match="valid choices"):
        InputStats(["hesian"], 4)
    acc = InputStats(["act_absmax"], 4)
    with pytest.raises(ValueError, match="expects 4"):
        acc.update(torch.zeros(2, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_true_sequential_stages_found_from_data(family: str, calib: torch.Tensor) -> None:
    model = tiny_model(family)
    path, blocks = find_blocks(model)
    assert path == "model.layers" and len(blocks) == 2
    calls = capture_block_inputs(model, blocks[0], calib)
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        stages = linear_stages(blocks[0], names, lambda: run_block(blocks[0], calls[0]))
    assert stages == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_find_blocks_errors_name_the_paths_tried() -> None:
    with pytest.raises(ValueError, match="model.layers"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_inputs_replay_the_model(family: str, calib: torch.Tensor) -> None:
    """Block 0's captured args/kwargs, pushed through every block, give exactly the model's last block output,
    and capturing never runs a later block."""
    model = tiny_model(family, layers=3)
    _, blocks = find_blocks(model)
    later = []
    h = blocks[1].register_forward_pre_hook(lambda *a: later.append(1))
    with torch.no_grad():
        calls = capture_block_inputs(model, blocks[0], calib, batch_size=4)
    h.remove()
    assert later == [] and len(calls) == 2
    ref: list[torch.Tensor] = []
    h = blocks[-1].register_forward_hook(lambda m, a, o: ref.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for ids in torch.split(calib, 4):
            model(ids, use_cache=False)
        h.remove()
        for call, want in zip(calls, ref):
            x = call
            for blk in blocks:
                out = run_block(blk, x)
                x = type(call)((out, *call.args[1:]), call.kwargs)
            torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_true_sequential_stats_are_those_of_the_quantized_model(family: str, calib: torch.Tensor) -> None:
    """Every layer's statistics equal those of its inputs in the final quantized model: earlier stages and
    earlier blocks were already quantized when they were collected (float64 textbook statistics)."""
    model = tiny_model(family)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    cfg = Recorder()
    blocks_seen: list[int] = []

    def progress(it: Any, total: int, desc: str) -> Any:
        blocks_seen.append(total)
        return it

    quantize_sequential(model, cfg, calib, progress=progress)
    assert blocks_seen == [2]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert isinstance(model.lm_head, nn.Linear)
    X = layer_inputs(model, names, calib)
    assert len(cfg.seen) == len(names)
    # stages run q/k/v, o, gate/up, down: the modules' own order in these families
    for i, name in enumerate(names):
        st, W = cfg.seen[i]
        assert torch.equal(W, tiny_model(family).get_submodule(name).weight.detach())
        ref = textbook_stats(X[name])
        for k in STATS:
            torch.testing.assert_close(st[k].double(), ref[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


def test_without_true_sequential_o_proj_sees_float_inputs(calib: torch.Tensor) -> None:
    fp = tiny_model("llama")
    X_fp = layer_inputs(fp, ["model.layers.0.self_attn.o_proj"], calib)["model.layers.0.self_attn.o_proj"]
    for ts in (False, True):
        cfg = Recorder()
        quantize_sequential(tiny_model("llama"), cfg, calib, true_sequential=ts)
        H_o = cfg.seen[3][0]["hessian"].double()  # block 0: q, k, v, then o
        same = torch.allclose(H_o, textbook_stats(X_fp)["hessian"], rtol=1e-4, atol=1e-5)
        assert same is (not ts)


def test_prepare_block_hook_gets_float_stats_before_quantization(calib: torch.Tensor) -> None:
    calls_seen: list[tuple[int, list[str], bool]] = []

    @dataclass(frozen=True)
    class WithPrepare(Recorder):
        def prepare_block(self, block: nn.Module, inputs: list, stats: dict) -> None:
            still_float = all(isinstance(block.get_submodule(n), nn.Linear) for n in stats)
            calls_seen.append((len(inputs), sorted(stats), still_float))
            assert set(stats["mlp.down_proj"]) == set(STATS)

    quantize_sequential(tiny_model("llama"), WithPrepare(), calib, batch_size=4)
    assert len(calls_seen) == 2
    assert calls_seen[0][0] == 2 and calls_seen[0][2] is True and "self_attn.q_proj" in calls_seen[0][1]


def test_targets_outside_blocks_are_calibrated_too(calib: torch.Tensor) -> None:
    model = tiny_model("llama")
    cfg = Recorder()
    quantize_sequential(model, cfg, calib, targets=["lm_head"])
    assert isinstance(model.lm_head, QuantLinear) and len(cfg.seen) == 1
    assert cfg.seen[0][0]["hessian"].shape == (64, 64)


def test_bad_calibration_and_options_are_rejected() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="token ids"):
        quantize_sequential(model, Recorder(), torch.randn(2, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_sequential(model, Recorder(), [[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no Linear layer matched"):
        quantize_sequential(model, Recorder(), torch.zeros(1, 4, dtype=torch.long), targets=["nothing"])


def test_collect_input_stats_stop_early_skips_the_rest(calib: torch.Tensor) -> None:
    model = tiny_model("llama")
    blk = model.model.layers[0]
    ran_mlp = []
    h = blk.mlp.register_forward_pre_hook(lambda *a: ran_mlp.append(1))
    from lowbit.calibration.hooks import StopForward

    with torch.no_grad(), collect_input_stats({"o": blk.self_attn.o_proj}, ["act_absmax"], stop_early=True) as st:
        calls = capture_block_inputs(model, blk, calib)
        with pytest.raises(StopForward):
            run_block(blk, calls[0])
    h.remove()
    assert ran_mlp == [] and st["o"].n == 6 * 24


def test_fisher_diagonal_is_mean_squared_gradient() -> None:
    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(2))
    name = "model.layers.0.mlp.down_proj"
    F = fisher_diagonal(model, ids, [name])[name]
    ref = torch.zeros_like(F)
    w = model.get_submodule(name).weight
    for row in ids:
        logits = model(row[None]).logits
        loss = nn.functional.cross_entropy(logits[0, :-1], row[1:])
        (g,) = torch.autograd.grad(loss, [w])
        ref += g.square() / 3
    torch.testing.assert_close(F, ref, rtol=1e-5, atol=1e-12)
    assert w.requires_grad  # restored to its original state (parameters are trainable by default)


def test_layer_reached_by_no_token_gets_identity_hessian(calib: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    """Like an MoE expert no token is routed to: the layer is still quantized, with round-to-nearest."""

    class Gate(nn.Module):
        def __init__(self, mlp: nn.Module) -> None:
            super().__init__()
            self.mlp, self.unused = mlp, nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x)

    model = tiny_model("llama")
    model.model.layers[0].mlp = Gate(model.model.layers[0].mlp)
    cfg = Recorder()
    with caplog.at_level("WARNING"):
        quantize_sequential(model, cfg, calib)
    assert "mlp.unused saw no calibration tokens" in caplog.text
    assert isinstance(model.model.layers[0].mlp.unused, QuantLinear)
    hs = [st["hessian"] for st, W in cfg.seen.values() if st["act_absmax"].abs().sum() == 0]
    assert len(hs) == 1 and torch.equal(hs[0], torch.eye(64))
