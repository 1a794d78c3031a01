"""A Hugging Face model imported with tools/convert_checkpoint.py trains with the real CLI (--finetune), and
the imported weights are what it starts from."""

import os
import subprocess
import sys

import torch

from tests.conversion.helpers import tiny_hf
from tests.training.cli import ROOT, check, env, read_metrics, run


def test_imported_checkpoint_finetunes_with_pretrain_cli(tmp_path):
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    tiny_hf("llama", hf_dir, vocab=100)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "import", "--hf-dir",
                    hf_dir, "--save", ckpt, "--strategy", "hg", "--seq-length", "16"],
                   check=True, cwd=ROOT, env=env(), capture_output=True, text=True)
    flags = open(os.path.join(ckpt, "model_flags.txt")).read().split()
    metrics = str(tmp_path / "m.jsonl")
    # NullTokenizer with 99 ids + eod = the HF vocabulary of 100, padded like the importer did
    out = check(run([*flags, "--load", ckpt, "--finetune", "--mock-data", "--tokenizer-type", "NullTokenizer",
                     "--vocab-size", "99", "--micro-batch-size", "2", "--global-batch-size", "2",
                     "--train-iters", "2", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0",
                     "--metrics-file", metrics, "--no-scale-vector-stats", "--seed", "3"], nproc=1))
    assert "loaded checkpoint" in out.stdout
    losses = {i: r["loss"] for i, r in read_metrics(metrics).items()}
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # a randomly initialized model of this vocabulary would start near ln(100) = 4.6; the imported HF
    # weights (init range 0.2) give a clearly different loss, i.e. the weights were really loaded
    assert abs(losses[1] - torch.log(torch.tensor(100.0)).item()) > 0.05
