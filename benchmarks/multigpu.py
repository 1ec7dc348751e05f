"""Scaling of distributed calibration (GPTQ) and QLoRA (FSDP2) over 1, 2, 4 GPUs, with bit-identity checks.

For each world size N (1, 2, and 4 when that many devices exist) this script launches, once per phase,
``torchrun --standalone --nproc_per_node N benchmarks/multigpu.py --worker --phase calib|calib1|qlora ...``:

1. builds the same random-weight Llama on every rank (default ~1.0 B parameters: hidden 2048, MLP 5632,
   16 layers, vocab 32000, bf16) and quantizes it with ``GPTQConfig(IntAffine(4, group_size=128))`` on
   random calibration tokens (default 128 × 512) through ``lowbit.calibration.sequential`` with the
   samples split over the ranks (:mod:`lowbit.calibration.distributed`); records the wall time and a
   SHA-256 of the quantized model (every rank) and of every reduced statistic (rank 0);
2. (``calib1``) the same with ``true_sequential=False`` (all seven layers of a block quantized from one
   statistics pass, so up to seven in parallel), run after both phases of every N;
3. builds the model again in fp32, quantizes its base to NF4, adds LoRA r=16 and trains the adapters with
   FSDP2 (:mod:`lowbit.train.distributed`), global batch 8 × 512, reporting per-step time after warm-up and
   the loss curve.

The driver compares hashes across ranks and world sizes (bit-identity) and QLoRA losses against N=1,
prints a table and writes it to ``$OUT/multigpu.md`` (or ``--out``). Failures of a launch are reported in
the table and the exit status, never hidden. A time budget (``--budget``, default 450 s) bounds the whole
run; world sizes that do not fit are listed as not run.

Run (the GPU machine)::

    python benchmarks/multigpu.py                      # 1, 2 (, 4) GPUs, writes $OUT/multigpu.md

CPU check (what the test runs)::

    python benchmarks/multigpu.py --device cpu --tiny --world-sizes 1,2 --out /tmp/multigpu.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SIZES = {  # model shape, calibration samples × seq_len in batches, QLoRA seq_len, steps, global batch
    "1b": dict(hidden=2048, intermediate=5632, layers=16, heads=16, vocab=32000, samples=128, seq_len=512,
               qlora_seq=512, qlora_steps=12, calib_batch=8, qlora_batch=8),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=256, samples=8, seq_len=32,
                 qlora_seq=32, qlora_steps=4, calib_batch=2, qlora_batch=4),
}


CALIB_PHASES = {"calib": "GPTQ, true-sequential stages (default)",
                "calib1": "GPTQ, one statistics pass per block (true_sequential=False)"}


def log(msg: str) -> None:
    print(f"[multigpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- worker

def build_model(a: argparse.Namespace, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=max(a.seq_len, a.qlora_seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def state_hash(model: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from lowbit.calibration.distributed import ShardedCalibration, init_from_env

    init_from_env()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    cuda = a.device == "cuda"
    if cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(1)

    def say(msg: str) -> None:
        if rank == 0:
            log(f"N={world}: {msg}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    class HashingShards(ShardedCalibration):
        """Checksums the bits of every reduced statistic on the device (rank 0), so identity is checked before
        rounding too: a plain and a position-weighted sum of the int32 bit patterns (cheap inside the timed
        region; any single changed value changes them), hashed at the end."""

        sums: list[int] = []

        def collect(self, *args: Any, **kwargs: Any) -> Any:
            out = super().collect(*args, **kwargs)
            if self.rank == 0:
                for n in sorted(out):
                    for k in sorted(out[n]):
                        bits = out[n][k].detach().contiguous().view(-1).view(torch.int32).to(torch.int64)
                        w = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
                        self.sums += [int(bits.sum()), int((bits * w).sum())]
            return out

        def digest(self) -> str:
            return hashlib.sha256(json.dumps(self.sums).encode()).hexdigest()[:16]

    result: dict[str, Any] = {"world_size": world, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                              "torch": torch.__version__}
    if a.phase in CALIB_PHASES:
        result.update(calibrate(a, dev, say, sync, HashingShards(), a.phase))
    else:
        result.update(qlora(a, dev, say, sync))
    if rank == 0:
        tmp = a.result + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.result)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def calibrate(a: argparse.Namespace, dev: Any, say: Any, sync: Any, shards: Any, phase: str) -> dict[str, Any]:
    """GPTQ through the distributed runner (``phase``: true-sequential stages or one pass per block); wall
    time, peak memory, weight hashes of every rank, statistics checksum; keys prefixed with ``phase``."""
    import torch
    import torch.distributed as dist

    from lowbit.calibration.sequential import quantize_sequential
    from lowbit.formats.affine import IntAffine
    from lowbit.methods.gptq.api import GPTQConfig

    cuda, world = dev.type == "cuda", shards.world_size
    result: dict[str, Any] = {}
    t = time.perf_counter()
    model = build_model(a, dev, torch.bfloat16 if cuda else torch.float32)
    calib = torch.randint(0, a.vocab, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(1))
    say(f"model built ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
        f"{time.perf_counter() - t:.1f}s); GPTQ over {a.samples}x{a.seq_len} tokens")
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t_blocks = time.perf_counter()

    def progress(it: Any, total: int | None = None, desc: str = "") -> Any:
        for i, x in enumerate(it):
            yield x
            say(f"{desc} {i + 1}/{total} ({time.perf_counter() - t_blocks:.1f}s)")

    sync()
    t0 = time.perf_counter()
    cfg = GPTQConfig(format=IntAffine(bits=4, group_size=128 if a.hidden % 128 == 0 else 32))
    quantize_sequential(model, cfg, calib, batch_size=a.calib_batch, distributed=shards, progress=progress,
                        true_sequential=phase == "calib")
    sync()
    result["seconds"] = time.perf_counter() - t0
    result["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    mine = state_hash(model)
    hashes = [None] * world
    if world > 1:
        dist.all_gather_object(hashes, mine)
    else:
        hashes = [mine]
    result["weight_hashes"] = hashes
    result["stats_hash"] = shards.digest()
    say(f"{CALIB_PHASES[phase]}: {result['seconds']:.1f}s, weights {hashes}")
    return {f"{phase}_{k}": v for k, v in result.items()}


def qlora(a: argparse.Namespace, dev: Any, say: Any, sync: Any) -> dict[str, Any]:
    """QLoRA steps with FSDP2; per-step time after warm-up, losses (mean over ranks), peak memory."""
    import torch
    import torch.distributed as dist

    from lowbit.train.distributed import prepare_qlora, train_qlora

    cuda = dev.type == "cuda"
    world = dist.get_world_size() if dist.is_initialized() else 1
    result: dict[str, Any] = {}
    t = time.perf_counter()
    qm = build_model(a, dev, torch.float32)
    prepare_qlora(qm, r=16, alpha=16.0, seed=0)
    say(f"QLoRA model ready ({time.perf_counter() - t:.1f}s): NF4 base, LoRA r=16, FSDP2 over {world}")
    blocks = torch.randint(0, a.vocab, (64, a.qlora_seq), generator=torch.Generator().manual_seed(2))
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    prof_dir = os.environ.get("LOWBIT_QLORA_PROFILE")  # a folder: profile steps 3-4, one table per rank
    prof = None
    if prof_dir:
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = profile(activities=acts, schedule=schedule(wait=2, warmup=0, active=2, repeat=1))
        prof.start()

    def step_done(step: int, loss: float) -> None:
        if cuda:
            torch.cuda.synchronize()
        say(f"qlora step {step}/{a.qlora_steps} loss {loss:.4f}")
        if prof is not None:
            prof.step()
            if step == 4:
                prof.stop()
                rank = dist.get_rank() if dist.is_initialized() else 0
                key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                Path(prof_dir, f"qlora_profile_n{world}_rank{rank}.txt").write_text(
                    prof.key_averages().table(sort_by=key, row_limit=40)
                    + "\n" + prof.key_averages().table(sort_by="count", row_limit=40))

    run = train_qlora(qm, blocks, steps=a.qlora_steps, batch_size=a.qlora_batch, lr=1e-4, seed=0,
                      progress=step_done)
    sync()
    warm = min(2, a.qlora_steps - 1)
    result["qlora_losses"] = run.losses
    result["qlora_step_seconds"] = statistics.median(run.step_seconds[warm:])
    result["qlora_tokens_per_step"] = run.tokens_per_step
    result["qlora_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    return result


# ------------------------------------------------------------------------------------------------- driver

def model_args(a: argparse.Namespace) -> list[str]:
    keys = ("hidden", "intermediate", "layers", "heads", "vocab", "samples", "seq_len", "qlora_seq", "qlora_steps",
            "calib_batch", "qlora_batch")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))] + ["--device", a.device]


def launch(a: argparse.Namespace, n: int, phase: str, result: Path, timeout: float
           ) -> tuple[dict[str, Any] | None, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), "--worker", "--phase", phase, "--result", str(result), *model_args(a)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log(f"launch N={n} {phase}: {' '.join(cmd[1:6])} ... (timeout {timeout:.0f}s)")
    p = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun runs its ranks in sessions of their own; on SIGTERM it terminates them (then kills them)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return None, f"{phase} timed out after {timeout:.0f}s"
    if rc != 0:
        return None, f"{phase} exit status {rc} (see the output above)"
    if not result.exists():
        return None, "finished without writing a result"
    return json.loads(result.read_text()), ""


def table(a: argparse.Namespace, runs: dict[int, dict[str, Any]], failed: dict[tuple[int, str], str],
          skipped: list[tuple[int, str]]) -> tuple[str, bool]:
    """Two markdown tables (calibration, QLoRA); ``ok`` only if every launch ran and every check passed."""
    base = runs.get(1, {})
    ok = not failed and not skipped
    unit = "GPUs" if a.device == "cuda" else "CPU ranks"
    gib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    sizes = sorted({*runs, *(n for n, _ in failed), *(n for n, _ in skipped)})

    def missing(n: int, phase: str) -> str:
        return "FAILED" if (n, phase) in failed else "not run (time budget)"

    cal = [f"| {unit} | " + " | ".join(f"{h} s | speed-up | weights = N=1 | ranks agree | stats = N=1 | peak GiB/rank"
                                      for h in ("true-sequential", "one-pass")) + " |", "|---" * 13 + "|"]
    qlo = [f"| {unit} | QLoRA s/step | speed-up | tokens/s | max abs Δloss vs N=1 | peak GiB/rank |", "|---" * 6 + "|"]
    for n in sizes:
        r = runs.get(n, {})
        cells = [str(n)]
        for ph in CALIB_PHASES:
            if f"{ph}_seconds" not in r:
                cells += [missing(n, ph), "", "", "", "", ""]
                continue
            hashes, b = r[f"{ph}_weight_hashes"], base.get(f"{ph}_weight_hashes")
            agree = len(set(hashes)) == 1
            same_w = b is not None and hashes[0] == b[0]
            same_s = base.get(f"{ph}_stats_hash") == r[f"{ph}_stats_hash"]
            ok &= agree and same_w and same_s
            speed = f"{base[f'{ph}_seconds'] / r[f'{ph}_seconds']:.2f}x" if f"{ph}_seconds" in base else "no N=1"
            cells += [f"{r[f'{ph}_seconds']:.1f}", speed, f"{'yes' if same_w else 'NO'} ({hashes[0]})",
                      "yes" if agree else "NO", "yes" if same_s else "NO", gib(r[f"{ph}_peak_gib"])]
        cal.append("| " + " | ".join(cells) + " |")
        if "qlora_step_seconds" in r:
            sp = r["qlora_step_seconds"]
            has_base = "qlora_step_seconds" in base
            dloss = max(abs(x - y) for x, y in zip(r["qlora_losses"], base["qlora_losses"])) if has_base else None
            q = [f"{sp:.3f}", f"{base['qlora_step_seconds'] / sp:.2f}x" if has_base else "no N=1",
                 f"{r['qlora_tokens_per_step'] / sp:.0f}", "-" if dloss is None else f"{dloss:.2e}",
                 gib(r["qlora_peak_gib"])]
        else:
            q = [missing(n, "qlora"), "", "", "", ""]
        qlo.append("| " + " | ".join([str(n), *q]) + " |")
    lines = ["## Calibration (GPTQ)", "", *cal, "", "## QLoRA (FSDP2)", "", *qlo]
    if failed:
        lines += ["", *(f"N={n} {ph} failed: {err}  " for (n, ph), err in sorted(failed.items()))]
    dev = next(iter(runs.values()))["device"] if runs else a.device
    tv = next(iter(runs.values()))["torch"] if runs else "?"
    n_params = (a.vocab * a.hidden * 2 + a.layers * (4 * a.hidden ** 2 + 3 * a.hidden * a.intermediate)) / 1e9
    head = [
        "# Multi-GPU scaling: distributed GPTQ calibration and FSDP2 QLoRA", "",
        f"Command: `python benchmarks/multigpu.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {dev} × up to {max(sizes, default=0)}, torch {tv}, {platform.node()}  ",
        f"Model: random-weight Llama, hidden {a.hidden}, MLP {a.intermediate}, {a.layers} layers, vocab {a.vocab} "
        f"(~{n_params:.2f} B parameters).  ",
        f"Calibration: GPTQ 4-bit IntAffine, {a.samples} samples × {a.seq_len} tokens in batches of "
        f"{a.calib_batch}, samples split over ranks, statistics in a fixed pairwise tree "
        f"(lowbit.calibration.distributed), {'bf16 model' if a.device == 'cuda' else 'fp32 model, 1 thread/rank'}; "
        "true-sequential: statistics re-collected after each stage (q/k/v, o, gate/up, down), the stage's layers "
        "quantized in parallel over ranks; one-pass: all seven layers of a block from one statistics pass, in "
        "parallel.  ",
        f"QLoRA: fp32 model, NF4 base (unsharded buffers), LoRA r=16 on every Linear, FSDP2, global batch "
        f"{a.qlora_batch} × {a.qlora_seq}, {a.qlora_steps} steps; s/step is the median after 2 warm-up steps.  ",
        "Bit-identity: SHA-256 of the whole quantized state dict (every rank) and a checksum of the bits of "
        "every reduced statistic (rank 0), compared with N=1.", "",
    ]
    notes = ["", "Not measured: real model weights/perplexity (random weights: only speed and identity), "
             "multi-node, AWQ/SmoothQuant scaling (their block search runs on every rank), "
             "QLoRA in bf16 autocast, models larger than one card."]
    return "\n".join(head + lines + notes) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (for the CPU test)")
    ap.add_argument("--world-sizes", default=None, help="comma list (default: 1,2,4 up to the GPUs present)")
    ap.add_argument("--out", default=None, help="table path (default: $OUT/multigpu.md, else ./multigpu.md)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all launches together")
    ap.add_argument("--launch-timeout", type=float, default=240.0, help="seconds for one launch at most")
    ap.add_argument("--phase", choices=[*CALIB_PHASES, "qlora"], default="calib", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    for k, v in SIZES["1b"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    a = ap.parse_args(argv)
    for k, v in SIZES["tiny" if a.tiny else "1b"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.worker:
        worker(a)
        return 0

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible; use --device cpu for the CPU check")
    have = torch.cuda.device_count() if a.device == "cuda" else 2
    sizes = [int(x) for x in a.world_sizes.split(",")] if a.world_sizes else [n for n in (1, 2, 4) if n <= have]
    if a.device == "cuda" and max(sizes) > have:
        ap.error(f"--world-sizes {sizes} but only {have} GPUs are visible")
    if 1 not in sizes:
        ap.error("--world-sizes must include 1 (the baseline every other size is compared with)")
    if -(-a.samples // a.calib_batch) < max(sizes) or any(a.qlora_batch % n for n in sizes):
        ap.error(f"{a.samples} samples in batches of {a.calib_batch} must give at least {max(sizes)} batches, and "
                 f"--qlora-batch {a.qlora_batch} must be a multiple of every world size {sizes}")
    out = Path(a.out or os.path.join(os.environ.get("OUT", "."), "multigpu.md"))
    log(f"world sizes {sizes}, device {a.device}, budget {a.budget:.0f}s, table -> {out}")
    deadline = time.monotonic() + a.budget
    runs: dict[int, dict[str, Any]] = {}
    failed: dict[tuple[int, str], str] = {}
    skipped: list[tuple[int, str]] = []
    # the default path's two phases for every N first (a short budget still gives complete rows), then the
    # one-pass calibration variant
    order = [(n, ph) for n in sizes for ph in ("calib", "qlora")] + [(n, "calib1") for n in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        for n, phase in order:
            left = deadline - time.monotonic()
            if left < 30:
                skipped.append((n, phase))
                log(f"N={n} {phase}: not run, {left:.0f}s of the budget left")
                continue
            t = time.perf_counter()
            res, err = launch(a, n, phase, Path(tmp) / f"n{n}-{phase}.json", min(left, a.launch_timeout))
            if res is None:
                failed[(n, phase)] = err
                log(f"N={n}: FAILED: {err}")
                continue
            runs.setdefault(n, {}).update(res)
            log(f"N={n} {phase}: done in {time.perf_counter() - t:.0f}s")
    text, ok = table(a, runs, failed, skipped)
    print(text, flush=True)
    from lowbit.io.atomic import atomic_file

    with atomic_file(out, overwrite=True, mode="w") as f:
        f.write(text)  # type: ignore[attr-defined]
    log(f"wrote {out}; {'all checks passed' if ok else 'SOME CHECKS FAILED or runs missing'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
