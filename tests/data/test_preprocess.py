import os
import subprocess
import sys

import numpy
import pytest

from megatron_sv.data import indexed
from megatron_sv.data.preprocess import MalformedInputError, preprocess
from megatron_sv.data.tokenizers import build_tokenizer

from .conftest import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def expected_docs(tok, texts, append_eod=True):
    out = []
    for t in texts:
        ids = tok.tokenize(t)
        if ids:
            out.append(ids + [tok.eod] if append_eod else ids)
    return out


@pytest.fixture()
def corpus(tmp_path, stdlib_texts):
    texts = stdlib_texts[:40] + ["", "x = 1\n"]  # one empty document
    return write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)]), texts


@pytest.mark.parametrize("workers", [1, 2])
def test_output_equals_direct_tokenization(tmp_path, corpus, sp_args, workers):
    path, texts = corpus
    prefix = str(tmp_path / f"w{workers}")
    # small units: many work units in flight, so ordering across workers is exercised
    stats = preprocess([path], prefix, sp_args, workers=workers, append_eod=True, unit_bytes=8192, unit_docs=3)
    tok = build_tokenizer(**sp_args)
    want = expected_docs(tok, texts)
    assert read_back(prefix + "_text_document") == want
    assert stats.num_docs == len(texts)
    assert stats.num_empty["text"] == 1 and stats.num_written["text"] == len(texts) - 1
    assert stats.num_tokens["text"] == sum(map(len, want))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(prefix + "_text_document").index.dtype == numpy.uint16


def test_workers_give_identical_bytes(tmp_path, corpus, sp_args):
    path, _ = corpus
    for w in (1, 2):
        preprocess([path], str(tmp_path / f"o{w}"), sp_args, workers=w, unit_bytes=4096, unit_docs=2)
    for ext in (".bin", ".idx"):
        a = open(str(tmp_path / "o1_text_document") + ext, "rb").read()
        b = open(str(tmp_path / "o2_text_document") + ext, "rb").read()
        assert a == b and len(a) > 0


def test_plain_text_files_and_globs(tmp_path, sp_args, stdlib_texts):
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(stdlib_texts[:5]):
        (d / f"{i}.py").write_text(t, newline="")
    (d / "5.py").write_text("")
    stats = preprocess([str(d / "*.py")], str(tmp_path / "t"), sp_args, workers=2)
    tok = build_tokenizer(**sp_args)
    assert read_back(str(tmp_path / "t_text_document")) == expected_docs(tok, stdlib_texts[:5], append_eod=False)
    assert stats.num_empty["text"] == 1


def test_several_json_keys(tmp_path, sp_args):
    path = write_jsonl(tmp_path / "k.jsonl", [{"a": "def f():\n  pass\n", "b": "x\n"}, {"a": "y = 2", "b": ""}])
    stats = preprocess([path], str(tmp_path / "k"), sp_args, json_keys=["a", "b"])
    tok = build_tokenizer(**sp_args)
    assert read_back(str(tmp_path / "k_a_document")) == [tok.tokenize("def f():\n  pass\n"), tok.tokenize("y = 2")]
    assert read_back(str(tmp_path / "k_b_document")) == [tok.tokenize("x\n")]
    assert stats.num_empty == {"a": 0, "b": 1}


MALFORMED = [
    {"text": "a = 1\n"},
    "",
    '{"text": "b = 2\\n"',
    "[1, 2]",
    '{"other": "c"}',
    '{"text": 5}',
    {"text": "d = 4\n"},
]


def test_malformed_fail_reports_file_and_line(tmp_path, sp_args):
    path = write_jsonl(tmp_path / "bad.jsonl", MALFORMED)
    prefix = str(tmp_path / "bad")
    with pytest.raises(MalformedInputError, match=f"{path}:3: invalid JSON"):
        preprocess([path], prefix, sp_args, workers=2)
    assert not os.path.exists(prefix + "_text_document.bin")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no temporaries either


def test_malformed_skip_counts(tmp_path, sp_args):
    path = write_jsonl(tmp_path / "bad.jsonl", MALFORMED)
    stats = preprocess([path], str(tmp_path / "bad"), sp_args, on_malformed="skip", log=open(os.devnull, "w"))
    assert stats.num_malformed == 4  # lines 3-6; the blank line 2 is ignored
    assert [m.split(": ")[0] for m in stats.malformed_examples] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    tok = build_tokenizer(**sp_args)
    assert read_back(str(tmp_path / "bad_text_document")) == [tok.tokenize("a = 1\n"), tok.tokenize("d = 4\n")]


def test_failure_mid_write_leaves_nothing(tmp_path, corpus, sp_args, monkeypatch):
    path, _ = corpus
    real = indexed._Writer.add_document
    calls = []

    def failing(self, tokens):
        calls.append(1)
        if len(calls) == 10:
            raise OSError("disk full (simulated)")
        real(self, tokens)

    monkeypatch.setattr(indexed._Writer, "add_document", failing)
    with pytest.raises(OSError, match="simulated"):
        preprocess([path], str(tmp_path / "out"), sp_args, workers=2, unit_docs=2)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_existing_output_refused_unless_overwrite(tmp_path, corpus, sp_args):
    path, _ = corpus
    prefix = str(tmp_path / "o")
    preprocess([path], prefix, sp_args)
    before = open(prefix + "_text_document.bin", "rb").read()
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess([path], prefix, sp_args, append_eod=True)
    assert open(prefix + "_text_document.bin", "rb").read() == before
    preprocess([path], prefix, sp_args, append_eod=True, overwrite=True)
    assert len(open(prefix + "_text_document.bin", "rb").read()) > len(before)
    assert indexed.is_valid_indexed_dataset(prefix + "_text_document")


def test_errors_before_any_work(tmp_path, sp_args):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        preprocess([str(tmp_path / "*.jsonl")], str(tmp_path / "o"), sp_args)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(FileNotFoundError, match="missing.model"):
        preprocess(
            [path],
            str(tmp_path / "o"),
            {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": str(tmp_path / "missing.model")},
        )
    with pytest.raises(FileNotFoundError, match="output directory"):
        preprocess([path], str(tmp_path / "nodir" / "o"), sp_args)


def run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli(tmp_path, corpus, sp_model):
    path, texts = corpus
    tok_flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    r = run_cli("--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o"), *tok_flags)
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
    r = run_cli(
        "--input",
        path,
        "--output-prefix",
        str(tmp_path / "o"),
        *tok_flags,
        "--workers",
        "2",
        "--append-eod",
        "--log-interval",
        "10",
    )
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and "docs/s" in r.stderr
    assert f"{len(texts) - 1} documents" in r.stdout
    r = run_cli("--input", path, "--output-prefix", str(tmp_path / "o"), *tok_flags)
    assert r.returncode == 2 and "already exists" in r.stderr
