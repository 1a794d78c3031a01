"""A Hugging Face model imported with tools/convert_checkpoint.py trains with the real CLI (--finetune), and
the imported weights are what it starts from. The fine-tuned checkpoint then exports with its sentencepiece
tokenizer as Hugging Face tokenizer files (AutoTokenizer encodes and decodes exactly like sentencepiece)
and imports back with that tokenizer."""

import os
import shlex
import subprocess
import sys

import pytest
import torch

from megatron_sv.data.corpus import iter_stdlib_documents
from megatron_sv.data.sentencepiece_training import train_sentencepiece
from megatron_sv.data.tokenizers import build_tokenizer
from tests.conversion.helpers import tiny_hf
from tests.training.cli import ROOT, check, env, read_metrics, run

CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")
# texts that break careless conversions: runs of spaces and tabs, blank lines, non-ASCII, byte fallback
HARD_TEXTS = [
    "def f(x):\n\n\tif x:  # two  spaces\n        return x\r\n",
    "   leading spaces",
    "héllo wörld 日本 😀",
    "\x00\x01 control bytes",
    "",
]


def _convert(*args):
    return check(subprocess.run([sys.executable, CONVERT, *args], cwd=ROOT, env=env(), capture_output=True, text=True))


@pytest.mark.timeout(900)  # three tools and a training run: about 1 minute on an idle 2-core machine
def test_imported_checkpoint_finetunes_with_pretrain_cli_and_exports_its_tokenizer(tmp_path, single_process):
    from transformers import AutoTokenizer

    from megatron_sv.conversion import ConversionError, export_to_hf, import_from_hf

    # the default corpus's kind of tokenizer (same trainer and settings, smaller vocabulary and sample)
    corpus = [text for _, text in iter_stdlib_documents(max_bytes=300_000)]
    sp_model = str(tmp_path / "sp" / "tok") + ".model"
    train_sentencepiece(corpus, sp_model[: -len(".model")], vocab_size=600, input_sentence_size=20_000, num_threads=2)
    sp = build_tokenizer("SentencePieceTokenizer", sp_model)

    hf_dir, ckpt, tuned = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "tuned")
    tiny_hf("llama", hf_dir, vocab=sp.vocab_size)
    _convert("import", "--hf-dir", hf_dir, "--save", ckpt, "--strategy", "hg", "--seq-length", "16")
    flags = open(os.path.join(ckpt, "model_flags.txt")).read().split()
    assert "--tokenizer-model" not in flags  # that HF directory had no tokenizer
    metrics = str(tmp_path / "m.jsonl")
    out = check(
        run(
            [
                *flags,
                "--load",
                ckpt,
                "--finetune",
                "--save",
                tuned,
                "--mock-data",
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                sp_model,
                "--micro-batch-size",
                "2",
                "--global-batch-size",
                "2",
                "--train-iters",
                "2",
                "--lr",
                "1e-3",
                "--log-interval",
                "1",
                "--eval-iters",
                "0",
                "--metrics-file",
                metrics,
                "--no-scale-vector-stats",
                "--seed",
                "3",
            ],
            nproc=1,
        )
    )
    assert "loaded checkpoint" in out.stdout
    losses = {i: r["loss"] for i, r in read_metrics(metrics).items()}
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # a randomly initialized model of this vocabulary would start near ln(600) = 6.4; the imported HF
    # weights (init range 0.2) give a clearly different loss, i.e. the weights were really loaded
    assert abs(losses[1] - torch.log(torch.tensor(float(sp.vocab_size))).item()) > 0.05

    # export: the tokenizer recorded in the fine-tuned checkpoint becomes Hugging Face tokenizer files
    exported = str(tmp_path / "exported")
    export_to_hf(tuned, exported, log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    # corpus files beyond the tokenizer's training sample, and the edge cases
    texts = [text for _, text in iter_stdlib_documents(max_bytes=1_500_000)][-40:] + HARD_TEXTS
    assert len(texts) == 45
    for text in texts:
        ids = sp.tokenize(text)
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text[:60])
        assert tok.decode(ids) == text == sp.detokenize(ids), repr(text[:60])
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (sp.eos, sp.bos, sp.pad) and len(tok) == 600
    cfg = open(os.path.join(exported, "config.json")).read()
    assert '"vocab_size": 600' in cfg and f'"eos_token_id": {sp.eos}' in cfg  # padding rows dropped

    # import back: the tokenizer travels into the checkpoint, and the printed flags load it
    back = str(tmp_path / "back")
    import_from_hf(exported, back, strategy="hg", seq_length=16, log=lambda s: None)
    flags = shlex.split(open(os.path.join(back, "model_flags.txt")).read())
    kind, path = flags[flags.index("--tokenizer-type") + 1], flags[flags.index("--tokenizer-model") + 1]
    assert kind == "HuggingFaceTokenizer" and os.path.isdir(path)
    again = build_tokenizer(kind, path)
    assert [again.tokenize(t) for t in texts] == [sp.tokenize(t) for t in texts]
    assert again.eod == sp.eod and again.vocab_size == sp.vocab_size

    # the recorded tokenizer is gone: one clear error before any work, nothing written
    os.rename(sp_model, sp_model + ".moved")
    with pytest.raises(ConversionError, match="does not exist here; pass --tokenizer-model .* or --no-tokenizer"):
        export_to_hf(tuned, str(tmp_path / "none"), log=lambda s: None)
    assert not os.path.exists(tmp_path / "none")
