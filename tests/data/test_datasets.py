import os

import numpy
import pytest

from megatron_sv.data.datasets import build_train_valid_test_datasets, parse_blend, parse_split
from megatron_sv.data.indexed import write_indexed_dataset
from megatron_sv.data.preprocess import preprocess
from megatron_sv.data.tokenizers import build_tokenizer

from .conftest import write_jsonl

VOCAB = 100_000  # NullTokenizer: eod = VOCAB; token d * 1000 + i is position i of document d


def numbered_docs(n_docs, offset=0):
    rng = numpy.random.default_rng(0)
    return [[(offset + d) * 1000 + i for i in range(int(rng.integers(5, 60)))] for d in range(n_docs)]


def segments(tokens, eod):
    seg, out = [], []
    for t in tokens:
        if t == eod:
            out.append(seg)
            seg = []
        else:
            seg.append(t)
    out.append(seg)
    return [s for s in out if s]


def assert_from_documents(sample_tokens, docs_by_id, eod):
    """Every eod-free run is a contiguous slice of a single document."""
    for seg in segments(sample_tokens, eod):
        d, start = divmod(seg[0], 1000)
        assert seg == docs_by_id[d][start : start + len(seg)], seg


@pytest.fixture()
def numbered_dataset(tmp_path):
    docs = numbered_docs(50)
    write_indexed_dataset(str(tmp_path / "num"), [doc + [VOCAB] for doc in docs], vocab_size=VOCAB + 1)
    return str(tmp_path / "num"), docs


def test_parse_blend():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3 a 0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="odd token count"):
        parse_blend(["0.3", "a", "0.7"])
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_blend(["0.3", "a", "x", "b"])
    with pytest.raises(ValueError, match="numbers"):
        parse_blend(["a", "0.5", "b"])
    with pytest.raises(ValueError, match="expected a prefix"):
        parse_blend(["0.3", "0.4"])
    with pytest.raises(ValueError, match=">= 0"):
        parse_blend(["-1", "a"])
    with pytest.raises(ValueError, match="empty"):
        parse_blend([])


def test_parse_split():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    for bad in ("", "a,b,c", "1,2,3,4", "0,0,0", "1,,1", "-1,2"):
        with pytest.raises(ValueError, match="bad split"):
            parse_split(bad)


def test_missing_files_and_bad_arguments(tmp_path, numbered_dataset):
    prefix, _ = numbered_dataset
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    kw = dict(split="1,0,0", seq_length=16, seed=1, tokenizer=tok, train_valid_test_num_samples=[4, 0, 0])
    with pytest.raises(FileNotFoundError, match=r"missing .*nope\.bin"):
        build_train_valid_test_datasets([str(tmp_path / "nope")], **kw)
    with pytest.raises(FileNotFoundError, match="without the extension"):
        build_train_valid_test_datasets([prefix + ".bin"], **kw)
    os.remove(prefix + ".idx")
    with pytest.raises(FileNotFoundError, match=r"num\.idx"):
        build_train_valid_test_datasets([prefix], **kw)
    with pytest.raises(ValueError, match="odd token count"):
        build_train_valid_test_datasets(["1", prefix, "2"], **kw)
    with pytest.raises(ValueError, match="bad split"):
        build_train_valid_test_datasets([prefix], **{**kw, "split": "90,x"})


def test_samples_come_from_the_split_documents(tmp_path, numbered_dataset):
    prefix, docs = numbered_dataset
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    train, valid, test = build_train_valid_test_datasets(
        [prefix],
        "80,20,0",
        seq_length=32,
        seed=5,
        tokenizer=tok,
        train_valid_test_num_samples=[100, 10, 0],
        cache_dir=str(tmp_path / "cache"),
    )
    assert test is None and len(train) >= 100 and len(valid) >= 10
    docs_by_id = dict(enumerate(docs))
    for ds, allowed in ((train, range(0, 40)), (valid, range(40, 50))):
        for i in range(len(ds)):
            s = ds[i]
            tokens = s["tokens"].tolist() + [int(s["labels"][-1])]
            assert len(s["tokens"]) == 32
            assert s["labels"][:-1].tolist() == s["tokens"][1:].tolist()
            assert_from_documents(tokens, docs_by_id, tok.eod)
            assert {t // 1000 for t in tokens if t != tok.eod} <= set(allowed)
    # same seed, same samples: the cache is reused and deterministic
    again, _, _ = build_train_valid_test_datasets(
        [prefix],
        "80,20,0",
        seq_length=32,
        seed=5,
        tokenizer=tok,
        train_valid_test_num_samples=[100, 10, 0],
        cache_dir=str(tmp_path / "cache"),
    )
    assert all(numpy.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(20))


def test_weighted_blend(tmp_path):
    a, b = numbered_docs(20), numbered_docs(20, offset=50)
    write_indexed_dataset(str(tmp_path / "a"), [d + [VOCAB] for d in a], VOCAB + 1)
    write_indexed_dataset(str(tmp_path / "b"), [d + [VOCAB] for d in b], VOCAB + 1)
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    train, _, _ = build_train_valid_test_datasets(
        [f"1 {tmp_path / 'a'} 3 {tmp_path / 'b'}"],
        "1",
        seq_length=16,
        seed=1,
        tokenizer=tok,
        train_valid_test_num_samples=[200, 0, 0],
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(train) == 200
    docs_by_id = dict(enumerate(a)) | {50 + i: d for i, d in enumerate(b)}
    from_b = 0
    for i in range(len(train)):
        tokens = train[i]["tokens"].tolist()
        assert_from_documents(tokens, docs_by_id, tok.eod)
        from_b += tokens[0] // 1000 >= 50 if tokens[0] != tok.eod else 0
    assert 120 < from_b < 180  # about 3/4 of the samples


def test_preprocessed_sentencepiece_dataset(tmp_path, stdlib_texts, sp_args):
    texts = stdlib_texts[:30]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    preprocess([path], str(tmp_path / "c"), sp_args, append_eod=True, workers=2)
    tok = build_tokenizer(**sp_args)
    train, valid, _ = build_train_valid_test_datasets(
        [str(tmp_path / "c_text_document")],
        "90,10,0",
        seq_length=64,
        seed=3,
        tokenizer=tok,
        train_valid_test_num_samples=[50, 5, 0],
        cache_dir=str(tmp_path / "cache"),
    )
    docs = [numpy.array(tok.tokenize(t)) for t in texts]
    for i in range(len(train)):
        for seg in segments(train[i]["tokens"].tolist(), tok.eod):
            if len(seg) < 8:
                continue  # short runs may occur by chance in several documents
            hit = any(numpy.array_equal(d[j : j + len(seg)], seg) for d in docs for j in numpy.flatnonzero(d == seg[0]))
            assert hit, f"sample {i}: segment not found in any document"


def test_mock_datasets():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    train, valid, test = build_train_valid_test_datasets(
        None, "1,1,1", seq_length=16, seed=1, tokenizer=tok, train_valid_test_num_samples=[8, 4, 4], mock=True
    )
    assert len(train) >= 8 and train[0]["tokens"].shape == (16,)


def _build_on_two_ranks(rank, world_size, prefix, cache_dir, only_rank0):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    train, _, _ = build_train_valid_test_datasets(
        [prefix],
        "1",
        seq_length=16,
        seed=2,
        tokenizer=tok,
        train_valid_test_num_samples=[30, 0, 0],
        cache_dir=cache_dir,
        is_built_on_rank=(lambda: dist.get_rank() == 0) if only_rank0 else None,
    )
    return None if train is None else [train[i]["tokens"].tolist() for i in range(5)]


def test_distributed_build_rank0_first(tmp_path, numbered_dataset):
    from tests.helpers.distributed import run_distributed

    prefix, _ = numbered_dataset
    r0, r1 = run_distributed(_build_on_two_ranks, 2, args=(prefix, str(tmp_path / "cache"), False))
    assert r0 == r1 and len(r0) == 5
    # in a subdirectory keyed by the data files' size and mtime (megatron_sv.data.verify.data_stamp)
    assert any(f.endswith("document_index.npy") for _, _, files in os.walk(tmp_path / "cache") for f in files)
    r0, r1 = run_distributed(_build_on_two_ranks, 2, args=(prefix, str(tmp_path / "cache"), True))
    assert r1 is None and r0 is not None
