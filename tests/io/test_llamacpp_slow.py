"""Slow: llama.cpp itself loads lowbit's exported GGUF files and its next-token logits agree with lowbit's
PyTorch evaluation of the same file (top-1 agreement ≥ 99 %, perplexity within 1 %).

Needs a libllama built from llama.cpp source: ``LOWBIT_LLAMA_BUILD`` = a cmake build dir of llama.cpp (with
``bin/libllama.so`` or ``src/libllama.so``) and ``LOWBIT_LLAMA_SRC`` = its source tree (for ``include/``).
llama-cpp-python's PyPI sdist vendors the source: ``pip download --no-binary :all: llama-cpp-python``, then
``cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=OFF && cmake --build build --target
llama``. The client runs in a subprocess (a bad file can abort it). The last result is recorded in
``results/llamacpp_check.md``.

Two llama.cpp configurations are compared, because llama.cpp's default CPU matmuls are not "the dequantized
weights": they round every matmul input to 8 bits (Q8_0/Q8_K blocks, see ``lowbit.io.gguf_llamacpp``). On this
model that rounding makes the logits a chaotic function of float rounding: a 1e-7 relative change of the input
embeddings moves ~4 % of the top-1 tokens, and llama.cpp disagrees with itself (flash attention on vs off) on ~4 %.

- BLAS: the same libllama with ggml's BLAS backend (``LOWBIT_LLAMA_BLAS_LIBS`` = a directory with a BLAS-enabled
  ``libggml.so.0``, made by ``llamacpp/build_blas_ggml.sh`` or a ``-DGGML_BLAS=ON`` build) and weights not repacked:
  llama.cpp dequantizes the blocks with its own code and multiplies in f32 — the 99 % top-1 / 1 % PPL target.
- CPU (default backend): compared with lowbit's evaluation under ``emulate_llamacpp_cpu``; asserted: the emulation
  reproduces llama.cpp's quantized matmuls on identical inputs (first layer, dumped from llama.cpp), and the logits
  agree as closely as llama.cpp agrees with itself.
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
                    "-I", str(ggml_inc), "-L", str(lib), "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}",
                    *[f"-Wl,-rpath,{p.parent}" for p in Path(build).rglob("libggml*.so")], "-o", str(exe)],
                   check=True)
    return exe


def run_llama(exe: Path, gguf: Path, ids: list[int], out: Path, text: str | None = None,
              env: dict[str, str] | None = None) -> tuple[np.ndarray, str]:
    args = [str(exe), str(gguf), str(out), ",".join(map(str, ids))] + ([text] if text else [])
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert p.returncode == 0, f"llama.cpp failed ({p.returncode}):\n{p.stderr[-3000:]}"
    n_vocab = int(p.stdout.strip().splitlines()[-1].split("=")[1])
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), n_vocab), p.stdout


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-lp.gather(1, ids[1:, None]).mean())


def read_dump(path: Path) -> dict[str, np.ndarray]:
    """Tensors written by the client's LLAMA_LOGITS_DUMP (numpy shape = reversed ggml ne, squeezed)."""
    out, buf, pos = {}, path.read_bytes(), 0
    while pos < len(buf):
        n = int(np.frombuffer(buf, np.int32, 1, pos)[0])
        name = buf[pos + 4:pos + 4 + n].decode()
        ne = np.frombuffer(buf, np.int64, 4, pos + 4 + n)
        count = int(np.prod(ne))
        start = pos + 4 + n + 32
        out[name] = np.frombuffer(buf, np.float32, count, start).reshape(ne[::-1]).squeeze()
        pos = start + 4 * count
    return out


MIXES = ["F32", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL"]
TEXT = "def add(a, b):\n    return a + b  # 123"
# first-layer matmuls checked against llama.cpp's own output: (input tensor, output tensor, module of layer 0)
FIRST_LAYER = [("attn_norm-0", "Vcur-0", "self_attn.v_proj"), ("ffn_norm-0", "ffn_up-0", "mlp.up_proj"),
               ("ffn_swiglu-0", "ffn_out-0", "mlp.down_proj")]


@pytest.fixture(scope="module")
def default_model():
    from lowbit.data.corpora import evaluation_tokens
    from lowbit.data.models import load_model

    model, tok = load_model(None)
    return model, tok, evaluation_tokens(tok, max_tokens=512)[0]


@pytest.fixture(scope="module")
def exported(default_model, tmp_path_factory):
    from lowbit.io.gguf_export import export_gguf

    model, tok, _ = default_model
    cache: dict[str, Path] = {}

    def get(mix: str) -> Path:
        if mix not in cache:
            cache[mix] = tmp_path_factory.mktemp("gguf") / f"{mix}.gguf"
            export_gguf(model, tok, cache[mix], type=mix)
        return cache[mix]
    return get


def _agreement(ours: torch.Tensor, theirs: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float, float]:
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).double().mean())
    p_ours, p_theirs = math.exp(_nll(ours, ids)), math.exp(_nll(theirs, ids))
    return top1, p_ours, p_theirs, abs(p_theirs / p_ours - 1) * 100


def _log(line: str) -> None:
    print(line)
    with open(os.environ.get("LOWBIT_LLAMACPP_LOG", "/dev/null"), "a") as f:
        f.write(line + "\n")


@pytest.mark.parametrize("mix", MIXES)
def test_llamacpp_blas_agrees_with_lowbit_on_the_default_model(client, default_model, exported, tmp_path, mix):
    """llama.cpp (BLAS backend: its own dequantization, f32 matmuls) vs lowbit's PyTorch evaluation of the file."""
    from lowbit.io.gguf_model import load_gguf_model

    blas = os.environ.get("LOWBIT_LLAMA_BLAS_LIBS")
    if not blas:
        pytest.skip("set LOWBIT_LLAMA_BLAS_LIBS to a directory with a BLAS-enabled libggml (llamacpp/build_blas_ggml.sh)")
    _, tok, ids = default_model
    path = exported(mix)
    ours_model, _ = load_gguf_model(path)
    with torch.no_grad():
        ours = ours_model(ids[None]).logits[0]
    env = {"LD_LIBRARY_PATH": f"{blas}:{os.environ.get('LD_LIBRARY_PATH', '')}", "LLAMA_LOGITS_NO_REPACK": "1"}
    theirs, stdout = run_llama(client, path, ids.tolist(), tmp_path / "logits.bin", TEXT, env=env)
    assert "device=BLAS" in stdout.splitlines(), "the BLAS backend was not loaded"
    top1, p_ours, p_theirs, dppl = _agreement(ours, torch.from_numpy(theirs), ids)
    same_tok = stdout.splitlines()[0] == ",".join(map(str, tok.encode(TEXT)))
    _log(f"| BLAS | {mix} | {top1:.4f} | {p_ours:.4f} | {p_theirs:.4f} | {dppl:.3f} % | {same_tok} |")
    assert same_tok, "llama.cpp tokenizes the test text differently"
    assert top1 >= 0.99 and dppl < 1.0


@pytest.mark.parametrize("mix", MIXES)
def test_llamacpp_cpu_agrees_with_lowbit_emulation_on_the_default_model(client, default_model, exported, tmp_path,
                                                                         mix):
    """llama.cpp's default CPU backend vs lowbit with ``emulate_llamacpp_cpu``: (1) on llama.cpp's own first-layer
    inputs the emulated matmuls reproduce llama.cpp's outputs to float rounding (and plain dequantize-then-matmul
    does not, for quantized types); (2) the logits agree with llama.cpp as closely as llama.cpp agrees with itself
    with flash attention on vs off (its noise floor)."""
    from lowbit.io.gguf_llamacpp import emulate_llamacpp_cpu
    from lowbit.io.gguf_model import load_gguf_model

    _, _, ids = default_model
    path = exported(mix)
    ours_model, _ = load_gguf_model(path)
    with torch.no_grad():
        plain = ours_model(ids[None]).logits[0]
    emulate_llamacpp_cpu(ours_model, path)
    with torch.no_grad():
        emul = ours_model(ids[None]).logits[0]
    theirs = torch.from_numpy(run_llama(client, path, ids.tolist(), tmp_path / "a.bin")[0])
    theirs_fa_off = torch.from_numpy(run_llama(client, path, ids.tolist(), tmp_path / "b.bin",
                                               env={"LLAMA_LOGITS_FLASH_ATTN": "0"})[0])
    names = ",".join(n for pair in FIRST_LAYER for n in pair[:2])
    run_llama(client, path, ids[:64].tolist(), tmp_path / "c.bin",
              env={"LLAMA_LOGITS_DUMP": str(tmp_path / "dump.bin"), "LLAMA_LOGITS_DUMP_NAMES": names})
    dump = read_dump(tmp_path / "dump.bin")
    layer0 = ours_model.model.layers[0]
    errs = []
    for src, dst, mod_name in FIRST_LAYER:
        mod = layer0.get_submodule(mod_name)
        x, ref = torch.from_numpy(dump[src].copy()), torch.from_numpy(dump[dst].copy()).double()
        with torch.no_grad():
            e_emul = float((mod(x).double() - ref).abs().max() / ref.abs().max())
            e_plain = float((torch.nn.functional.linear(x, mod.weight).double() - ref).abs().max() / ref.abs().max())
        errs.append((mod_name, e_emul, e_plain))
    top1, p_emul, p_theirs, dppl = _agreement(emul, theirs, ids)
    top1_plain, p_plain, _, dppl_plain = _agreement(plain, theirs, ids)
    floor_top1, p_fa_off, _, floor_dppl = _agreement(theirs_fa_off, theirs, ids)
    worst = max(e for _, e, _ in errs)
    _log(f"| CPU | {mix} | {top1:.4f} | {top1_plain:.4f} | {floor_top1:.4f} | {p_emul:.4f} | {p_plain:.4f} | "
         f"{p_theirs:.4f} | {p_fa_off:.4f} | {dppl:.3f} % | {dppl_plain:.3f} % | {floor_dppl:.3f} % | "
         f"{worst:.1e} | {max(e for _, _, e in errs):.1e} |")
    for mod_name, e_emul, e_plain in errs:
        assert e_emul < 1e-5, f"{mod_name}: emulated matmul differs from llama.cpp's by {e_emul:.2e} (relative)"
        if mix not in ("F32",):
            assert e_plain > 10 * e_emul, f"{mod_name}: plain {e_plain:.2e} vs emulated {e_emul:.2e}"
    assert top1 >= floor_top1 - 0.02, "lowbit (emulated) agrees with llama.cpp less than llama.cpp with itself"
    assert dppl < max(1.0, 2 * floor_dppl)


def test_llamacpp_cpu_numerics_make_the_default_model_chaotic(default_model, exported):
    """Why the CPU comparison cannot reach 99 % top-1: with llama.cpp's 8-bit activation rounding the default model's
    logits are a chaotic function of float rounding. A relative perturbation of 1e-7 (about one float32 ulp) of
    the input embeddings moves the top-1 token at a few percent of positions under the emulation, and at none
    without it. Needs no llama.cpp."""
    from lowbit.io.gguf_model import load_gguf_model

    _, _, ids = default_model
    path = exported("Q8_0")
    agree = {}
    for emulate in (False, True):
        model, _ = load_gguf_model(path, llamacpp_cpu_numerics=emulate)
        emb = model.model.embed_tokens(ids[None]).detach()
        noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = model(inputs_embeds=emb).logits[0]
            b = model(inputs_embeds=emb * (1 + 1e-7 * noise)).logits[0]
        agree[emulate] = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    _log(f"| perturbation 1e-7 | Q8_0 | top-1 unchanged: plain {agree[False]:.4f}, emulated {agree[True]:.4f} |")
    assert agree[False] == 1.0
    assert agree[True] < 0.99
