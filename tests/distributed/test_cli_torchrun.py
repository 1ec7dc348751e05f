"""``torchrun --nproc_per_node 2 -m lowbit.cli.main quantize ...`` on CPU: the checkpoint equals the world-size-1
run of the same distributed runner through the Python API, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TEXT = "lowbit quantizes language models block by block, and then it evaluates them. " * 200


def tiny_model_dir(root: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lowbit.train.toy import tiny_llama

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT[:2000]], vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>", bos_token="<s>")
    tok.add_special_tokens({"eos_token": "</s>", "bos_token": "<s>"})
    d = root / "tiny"
    tiny_llama(vocab_size=320, hidden_size=64, intermediate_size=128).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.slow  # torchrun with 2 ranks importing transformers: ~20 s idle, ~45 s on a loaded CPU
def test_cli_quantize_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lowbit.calibration.distributed import ShardedCalibration
    from lowbit.calibration.sequential import quantize_sequential
    from lowbit.cli.options import build_method_config
    from lowbit.cli.main import build_parser
    from lowbit.data.corpora import calibration_tokens, load_text
    from lowbit.loading import load_with_tokenizer

    model_dir = tiny_model_dir(tmp_path)
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(TEXT)
    out = tmp_path / "q2"
    argv = ["quantize", str(model_dir), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples",
            "16", "--calib-seq-len", "32", "--calib-data", str(calib_file), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "lowbit.cli.main", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("quantized with") == 1  # rank 0 alone writes and reports

    # the same run in this process at world size 1 (same runner, same summation tree)
    torch.set_num_threads(1)
    args = build_parser().parse_args(argv)
    cfg = build_method_config(args.method, args.bits, args.group_size, args)
    model, tok = load_with_tokenizer(str(model_dir))
    calib = calibration_tokens(tok, n_samples=16, seq_len=32, seed=0, text=load_text(str(calib_file)))  # as the CLI reads it
    quantize_sequential(model, cfg, calib, distributed=ShardedCalibration(local=True))
    got = load_file(out / "model.safetensors")
    want = model.state_dict()
    qkeys = [k for k in want if k.endswith(("qdata", "scale", "zero_point"))]
    assert qkeys and all(k in got for k in qkeys)
    for k in qkeys:
        assert torch.equal(got[k], want[k]), k
