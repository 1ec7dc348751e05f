"""``lowbit demo``: every registered method appears, quick options apply unless --full, files are written."""

from __future__ import annotations

import json

import pytest

from lowbit.demo import demo_configs, run_demo
from lowbit.methods.base import get_method, method_registry


def test_demo_covers_every_registered_method_at_4_and_3_bits_where_supported() -> None:
    runs = demo_configs()
    for name in method_registry():
        cls = get_method(name)
        want = [b for b in (4, 3) if b in cls.bits_choices] or [min(cls.bits_choices)]
        assert [b for n, b, _ in runs if n == name] == want, name
    for name, bits, cfg in runs:
        assert cfg.kind == name
        assert getattr(cfg.format, "group_size", None) != 32, (name, bits)  # the publisher's Q4_1 grid


def test_w8a8_methods_show_their_activation_quantization() -> None:
    from lowbit.demo import activation_label

    labels = {(n, b): activation_label(c) for n, b, c in demo_configs()}
    assert labels[("smoothquant", 8)] == "int8/token" and labels[("llm_int8", 8)] == "int8/token"
    assert labels[("fp8", 8)] == "e4m3/token" and labels[("zeroquant_fp", 4)] == "e4m3/token"
    assert labels[("rtn", 4)] == labels[("gptq", 3)] == "float"


def test_quick_options_apply_unless_full(monkeypatch) -> None:
    cls = get_method("rtn")  # RTN's for_bits options go to its format: stand one in as the "quick" setting
    monkeypatch.setattr(cls, "quick_options", {"symmetric": True})
    (_, _, quick), = [r for r in demo_configs(["rtn"]) if r[1] == 4]
    (_, _, full), = [r for r in demo_configs(["rtn"], full=True) if r[1] == 4]
    assert quick.format.symmetric and not full.format.symmetric
    assert full == cls.for_bits(4, None)


def test_run_demo_writes_table_json_and_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    lines: list[str] = []
    rows = run_demo(tmp_path, ["rtn"], max_eval_tokens=256, ctx_len=128, calib_samples=1, calib_seq_len=32, jobs=1,
                    echo=lines.append)
    assert [r["method"] for r in rows] == ["unquantized", "rtn", "rtn"]
    assert rows[0]["ppl"] < rows[1]["ppl"] < rows[2]["ppl"]  # 4 bits beats 3 bits; both above the base
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["eval_tokens"] == 256 and len(data["rows"]) == 3
    md = (tmp_path / "results.md").read_text()
    assert md.count("| rtn |") == 2 and "already quantized" in md.lower() and "| act |" in md
    assert [r["act"] for r in rows] == ["float"] * 3
    assert (tmp_path / "ppl_vs_bits.png").stat().st_size > 1000


def test_run_demo_in_two_worker_processes_gives_the_in_process_rows(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    kw = dict(max_eval_tokens=256, ctx_len=128, calib_samples=2, calib_seq_len=32, echo=lambda _s: None)
    here = run_demo(tmp_path / "one", ["rtn", "nf4"], jobs=1, **kw)
    pool = run_demo(tmp_path / "two", ["rtn", "nf4"], jobs=2, **kw)
    # rows in the order asked for, whatever order the workers finished in
    assert [(r["method"], r["bits"]) for r in pool] == [(r["method"], r["bits"]) for r in here]
    assert [(r["method"], r["bits"]) for r in pool] == [("unquantized", 32), ("rtn", 4), ("rtn", 3), ("nf4", 4)]
    for a, b in zip(here, pool):
        assert "error" not in a and "error" not in b
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)  # same weights, one thread vs the parent's
        assert b["bits_per_weight"] == a["bits_per_weight"]
    data = json.loads((tmp_path / "two" / "results.json").read_text())
    assert data["jobs"] == 2 and data["eval_tokens"] == 256
    assert "2 runs at a time" in (tmp_path / "two" / "results.md").read_text()
    with pytest.raises(ValueError, match="jobs"):
        run_demo(tmp_path / "bad", ["rtn"], jobs=0, **kw)
