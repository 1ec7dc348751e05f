"""The lowbit command line: every subcommand on the default model, and clear errors on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lowbit.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_methods_json_lists_every_registered_method_with_options(capsys) -> None:
    from lowbit.methods.base import method_registry

    rc, out, _ = run(capsys, "methods", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert {r["method"] for r in rows} == set(method_registry())
    hqq = next(r for r in rows if r["method"] == "hqq")
    assert {"lp_norm", "beta", "kappa", "iters"} <= set(hqq["options"])
    assert hqq["calibration"] == []
    fp8 = next(r for r in rows if r["method"] == "fp8")
    assert fp8["calibration"] == [] and fp8["calibration_with_options"] == {"--gptq": ["hessian"]}


def test_option_stats_are_what_a_config_with_that_option_declares() -> None:
    from lowbit.methods.base import method_registry

    checked = 0
    for kind, cls in method_registry().items():
        for flag, stats in cls.option_stats.items():
            cfg = cls.for_bits(cls.bits_choices[-1], **{flag.lstrip("-").replace("-", "_"): True})
            assert set(stats) <= set(cfg.stats), (kind, flag, cfg.stats)
            assert not set(stats) <= set(cls.stats), (kind, flag)  # the option adds them
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("argv, match", [
    (["quantize", "--method", "nope", "--out", "x"], "unknown method 'nope'; valid choices"),
    (["quantize", "--method", "rtn", "--bits", "9", "--out", "x"], "bits=9; valid choices"),
    (["quantize", "--method", "rtn", "--beta", "3", "--out", "x"], "do not apply to method 'rtn'"),
    (["quantize", "--method", "rtn", "--group-size", "0", "--out", "x"], "--group-size 0 is invalid.*-1"),
    (["inspect", "/nonexistent/file.gguf"], "does not exist"),
    (["export", "ck", "--format", "onnx", "--out", "x"], "valid choices"),
])
def test_bad_input_gives_clear_error(capsys, tmp_path: Path, monkeypatch, argv: list[str], match: str) -> None:
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert re.search(match, err), err
    assert not (tmp_path / "x").exists()


def test_quantize_eval_inspect_on_default_model(capsys, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    rc, text, err = run(capsys, "quantize", "--method", "rtn", "--bits", "4", "--group-size", "64", "--out", str(out))
    assert rc == 0, err
    rc, text, err = run(capsys, "eval", str(out), "--json", "--max-tokens", "600", "--ctx-len", "300")
    assert rc == 0, err
    res = json.loads(text)
    assert {"ppl", "kl", "top1", "bits_per_weight", "bytes"} <= set(res)
    # 4-bit codes + fp16 scale and uint8 zero point per 64 weights: 4 + 24/64
    assert res["bits_per_weight"] == pytest.approx(4 + 24 / 64, abs=1e-9)
    assert 0 < res["kl"] < 0.5 and 0.5 < res["top1"] <= 1.0
    assert 1 < res["ppl"] < 100
    rc, text, err = run(capsys, "inspect", str(out), "--json")
    assert rc == 0, err
    info = json.loads(text)
    assert info["summary"]["method"] == "rtn"
    assert info["summary"]["quantized_layers"] == 30 * 7
    assert info["summary"]["quantized_bits_per_weight"] == pytest.approx(res["bits_per_weight"], rel=1e-6)
    # refusing to overwrite keeps the existing checkpoint
    rc, _, err = run(capsys, "quantize", "--method", "rtn", "--out", str(out))
    assert rc == 2 and "overwrite" in err


def test_inspect_gguf_default_model(capsys) -> None:
    from lowbit.data.models import default_model_path

    rc, text, err = run(capsys, "inspect", str(default_model_path()), "--json")
    assert rc == 0, err
    info = json.loads(text)
    kinds = {t["format"] for t in info["tensors"]}
    assert {"Q4_1", "Q8_0"} <= kinds
    assert info["summary"]["architecture"] == "llama"


def test_finetune_qlora_writes_adapter_and_plot(capsys, tmp_path: Path) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("lowbit quantizes language models. " * 200)
    out = tmp_path / "ft"
    rc, text, err = run(capsys, "finetune", "--method", "qlora", "--data", str(data), "--out", str(out),
                        "--steps", "2", "--seq-len", "32", "--batch-size", "1", "--rank", "4")
    assert rc == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"loss.png", "metrics.json", "adapter"} <= names, names
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}


def test_finetune_unknown_method_is_refused(capsys, tmp_path: Path) -> None:
    rc, _, err = run(capsys, "finetune", "--method", "nope", "--data", "x", "--out", str(tmp_path / "o"))
    assert rc == 2 and "valid choices" in err


def test_export_gguf_then_inspect_and_reload(capsys, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    rc, text, err = run(capsys, "export-gguf", "--type", "Q8_0", "--out", str(out))
    assert rc == 0, err
    rc, text, err = run(capsys, "inspect", str(out), "--json")
    assert rc == 0, err
    info = json.loads(text)
    assert "Q8_0" in {t["format"] for t in info["tensors"]}
    rc, _, err = run(capsys, "export-gguf", "--type", "Q8_0", "--out", str(out))
    assert rc == 2 and "overwrite" in err
