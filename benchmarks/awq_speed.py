"""AWQ search cost on the first blocks of the default model: time ratios against the all-samples search, and
the quality of each variant (held-out output error of those blocks), all in one process.

Rows (4-bit g128 by default, calibration 16 x 256 as the ``lowbit demo``):

- ``all, format fq``: alpha search on all samples, the format's own ``fake_quantize`` in the searches (the
  path before ``lowbit.methods.awq.api.fake_quantizer``), the baseline;
- ``all``: the default (same numbers, faster rounding in the searches);
- ``k of n``: ``search_samples=k`` (statistics and clipping still use all samples).

Quality: mean squared error of the truncated model's last hidden state against the float model on held-out
tokens (lower is better), and the same for plain RTN. Times are CPU wall times on whatever machine runs it; the
ratios are what to read (shared machines inflate absolute times).

Run: ``OMP_NUM_THREADS=1 python benchmarks/awq_speed.py --blocks 4 --bits 4``
"""

from __future__ import annotations

import argparse
import copy
import time
from unittest import mock

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--search-samples", default="4,2", help="comma-separated k for the subsampled rows")
    p.add_argument("--eval-tokens", type=int, default=2048)
    args = p.parse_args()

    from lowbit.data.corpora import calibration_tokens, evaluation_tokens
    from lowbit.data.models import load_model
    from lowbit.methods.awq import AWQConfig
    from lowbit.methods.base import get_method
    from lowbit.quantize import quantize_

    torch.manual_seed(0)
    base, tok = load_model(None, dtype=torch.float32)
    base.eval()
    base.model.layers = base.model.layers[: args.blocks]
    base.config.num_hidden_layers = args.blocks
    calib = calibration_tokens(tok, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
    held = evaluation_tokens(tok, max_tokens=args.eval_tokens).view(-1, 256)

    def hidden(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m.model(held).last_hidden_state.to(torch.float64)

    ref = hidden(base)
    cfg = AWQConfig.for_bits(args.bits, 128)
    rows: list[tuple[str, float, float]] = []

    def run(label: str, c: object, patch: bool = False) -> None:
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        if patch:
            with mock.patch("lowbit.methods.awq.api.fake_quantizer", lambda fmt: fmt.fake_quantize):
                quantize_(m, c, calibration=calib)
        else:
            quantize_(m, c, calibration=calib)
        dt = time.perf_counter() - t0
        err = float((hidden(m) - ref).pow(2).mean())
        rows.append((label, dt, err))
        print(f"{label:>24}  {dt:8.1f} s  output MSE {err:.6g}", flush=True)

    n = args.calib_samples
    run("all, format fq", cfg, patch=True)
    run("all", cfg)
    for k in [int(x) for x in args.search_samples.split(",") if x]:
        run(f"{k} of {n}", cfg.replace(search_samples=k))
    run("rtn (no search)", get_method("rtn").for_bits(args.bits, 128))
    t_base = rows[0][1]
    print(f"\nAWQ int{args.bits} g128, first {args.blocks} blocks of the default model, calibration "
          f"{n} x {args.calib_seq_len}, {held.numel()} held-out tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| variant | time / baseline | held-out output MSE |")
    print("|---|---|---|")
    for label, dt, err in rows:
        print(f"| {label} | {dt / t_base:.3f} | {err:.6g} |")


if __name__ == "__main__":
    main()
