"""Slow: llama.cpp itself loads lowbit's exported GGUF files and its next-token logits agree with lowbit's
PyTorch evaluation of the same file (top-1 agreement ≥ 99 %, perplexity within 1 %).

Needs a libllama built from llama.cpp source: ``LOWBIT_LLAMA_BUILD`` = a cmake build dir of llama.cpp (with
``bin/libllama.so`` or ``src/libllama.so``) and ``LOWBIT_LLAMA_SRC`` = its source tree (for ``include/``).
llama-cpp-python's PyPI sdist vendors the source: ``pip download --no-binary :all: llama-cpp-python``, then
``cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=OFF && cmake --build build --target
llama``. The client runs in a subprocess (a bad file can abort it). The last result is recorded in
``results/llamacpp_check.md``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _lib_dir(build: Path) -> Path | None:
    for cand in sorted(build.rglob("libllama.so*")):
        return cand.parent
    return None


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    build, src = os.environ.get("LOWBIT_LLAMA_BUILD"), os.environ.get("LOWBIT_LLAMA_SRC")
    if not build or not src or shutil.which("cc") is None:
        pytest.skip("set LOWBIT_LLAMA_BUILD and LOWBIT_LLAMA_SRC to a llama.cpp build and its source")
    lib = _lib_dir(Path(build))
    if lib is None:
        pytest.skip(f"no libllama.so under {build}")
    exe = tmp_path_factory.mktemp("client") / "llama_logits"
    ggml_inc = Path(src) / "ggml" / "include"
    subprocess.run(["cc", "-O1", str(HERE / "llamacpp" / "llama_logits.c"), "-I", str(Path(src) / "include"),
                    "-I", str(ggml_inc), "-L", str(lib), "-lllama", f"-Wl,-rpath,{lib}",
                    *[f"-Wl,-rpath,{p.parent}" for p in Path(build).rglob("libggml*.so")], "-o", str(exe)],
                   check=True)
    return exe


def run_llama(exe: Path, gguf: Path, ids: list[int], out: Path, text: str | None = None) -> tuple[np.ndarray, str]:
    args = [str(exe), str(gguf), str(out), ",".join(map(str, ids))] + ([text] if text else [])
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"llama.cpp failed ({p.returncode}):\n{p.stderr[-3000:]}"
    n_vocab = int(p.stdout.strip().splitlines()[-1].split("=")[1])
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), n_vocab), p.stdout


def _q8_act(x: torch.Tensor, kind: str) -> torch.Tensor:
    """llama.cpp's CPU matmul quantizes activations to its weight type's ``vec_dot_type``: Q8_0 (32-blocks,
    f16 scale, roundf) for the 32-block types, Q8_K (256-blocks, f32 scale, nearest_int) for K-quants/IQ4_XS."""
    shape = x.shape
    bs = 256 if kind == "Q8_K" else 32
    v = x.reshape(-1, bs).to(torch.float32)
    if kind == "Q8_0":
        d = (v.abs().amax(1, keepdim=True) / 127).to(torch.float16).to(torch.float32)
        idn = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.sign(v * idn) * torch.floor((v * idn).abs() + 0.5)
    else:
        amax_idx = v.abs().argmax(1, keepdim=True)
        mx = v.gather(1, amax_idx)
        isc = torch.where(mx != 0, -127 / mx, torch.zeros_like(mx))
        q = torch.round(isc * v).clamp(max=127)
        d = torch.where(isc != 0, 1 / isc, torch.zeros_like(isc))
    return (q * d).reshape(shape).to(x.dtype)


def emulate_llamacpp_activations(model: torch.nn.Module, gguf_path: Path) -> None:
    """Forward pre-hooks that quantize every matmul input as llama.cpp's CPU backend does for that weight type."""
    from lowbit.io.gguf_export import hf_to_gguf_name
    from lowbit.io.gguf_reader import read_gguf

    g = read_gguf(gguf_path)
    types = {n: t.ggml_type.name for n, t in g.tensors.items()}
    g.close()
    for name, mod in model.named_modules():
        gname = hf_to_gguf_name(name)
        t = types.get(f"{gname}.weight") if gname else None
        if t is None and name == "lm_head":
            t = types.get("output.weight", types.get("token_embd.weight"))
        if t is None or not isinstance(mod, torch.nn.Linear) or t in ("F32", "F16", "BF16"):
            continue
        kind = "Q8_K" if t.endswith("_K") or t == "IQ4_XS" else "Q8_0"
        if mod.in_features % (256 if kind == "Q8_K" else 32):
            continue
        mod.register_forward_pre_hook(lambda m, a, kind=kind: (_q8_act(a[0], kind),))


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-lp.gather(1, ids[1:, None]).mean())


@pytest.mark.parametrize("mix", ["F32", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL"])
def test_llamacpp_agrees_with_lowbit_on_the_default_model(client, tmp_path, mix):
    from lowbit.data.corpora import evaluation_tokens
    from lowbit.data.models import load_model
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_model import load_gguf_model

    model, tok = load_model(None)
    path = tmp_path / f"{mix}.gguf"
    export_gguf(model, tok, path, type=mix)
    ids = evaluation_tokens(tok, max_tokens=512)[0]
    ours_model, _ = load_gguf_model(path)
    with torch.no_grad():
        plain = ours_model(ids[None]).logits[0]
        emulate_llamacpp_activations(ours_model, path)
        ours = ours_model(ids[None]).logits[0]
    text = "def add(a, b):\n    return a + b  # 123"
    theirs, stdout = run_llama(client, path, ids.tolist(), tmp_path / "logits.bin", text)
    theirs = torch.from_numpy(theirs)
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).double().mean())
    ppl_ours, ppl_theirs = math.exp(_nll(ours, ids)), math.exp(_nll(theirs, ids))
    top1_plain = float((plain.argmax(-1) == theirs.argmax(-1)).double().mean())
    ppl_plain = math.exp(_nll(plain, ids))
    line = (f"| {mix} | {top1:.4f} | {top1_plain:.4f} | {ppl_ours:.4f} | {ppl_plain:.4f} | {ppl_theirs:.4f} | "
            f"{abs(ppl_theirs / ppl_ours - 1) * 100:.3f} % | {abs(ppl_theirs / ppl_plain - 1) * 100:.3f} % | "
            f"{stdout.splitlines()[0] == ','.join(map(str, tok.encode(text)))} |")
    print(line)
    with open(os.environ.get("LOWBIT_LLAMACPP_LOG", "/dev/null"), "a") as f:
        f.write(line + "\n")
    assert top1 >= 0.99, "top-1 agreement with llama.cpp's activation quantization emulated"
    assert abs(ppl_theirs / ppl_ours - 1) < 0.01 and abs(ppl_theirs / ppl_plain - 1) < 0.01
