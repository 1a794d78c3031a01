"""Data files are checked at start-up, each failure one line naming the file; regenerated data does not
reuse the old index cache; preprocess_data refuses an empty dataset."""

from __future__ import annotations

import os
import shutil

import pytest

from megatron_sv.data.datasets import build_train_valid_test_datasets
from megatron_sv.data.indexed import write_indexed_dataset
from megatron_sv.data.preprocess import EmptyDatasetError, preprocess
from megatron_sv.data.tokenizers import build_tokenizer
from megatron_sv.data.verify import DataFileError, check_indexed_dataset
from megatron_sv.training.cli import EXIT_BAD_ARGS, main
from tests.training.cli import TINY

from .conftest import write_jsonl

VOCAB = 255  # NullTokenizer: ids 0..254 plus eod 255


def _docs(n, length, lo=0, hi=VOCAB):
    return [[lo + (d * length + i) % (hi - lo) for i in range(length)] + [VOCAB] for d in range(n)]


@pytest.fixture()
def pair(tmp_path):
    prefix = str(tmp_path / "a")
    write_indexed_dataset(prefix, _docs(40, 30), vocab_size=VOCAB + 1)
    return prefix


def _train(prefix, extra=()):
    args = [x for x in TINY if x != "--mock-data"]
    return main([*args, "--train-iters", "2", "--data-path", prefix, "--split", "1,0,0", *extra])


def test_truncated_bin_is_refused_at_start_up(pair, capsys):
    with open(pair + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(pair + ".bin") - 8)
    assert _train(pair) == EXIT_BAD_ARGS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{pair}.bin: " in err[0] and "a truncated file" in err[0], err


def test_bin_of_another_dataset_is_refused(pair, tmp_path):
    other = str(tmp_path / "b")
    write_indexed_dataset(other, _docs(41, 30), vocab_size=VOCAB + 1)
    shutil.copy(other + ".bin", pair + ".bin")
    with pytest.raises(DataFileError, match=r"a\.bin: .* a \.bin and \.idx from different runs"):
        check_indexed_dataset(pair)


def test_truncated_idx_is_refused(pair):
    with open(pair + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(pair + ".idx") - 8)
    with pytest.raises(DataFileError, match=r"a\.idx: .* bytes, but its header describes"):
        check_indexed_dataset(pair)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    prefix = str(tmp_path / "big")
    write_indexed_dataset(prefix, [[1, 2, 300, 4, VOCAB]] * 20, vocab_size=1000)
    assert _train(prefix) == EXIT_BAD_ARGS  # 300 < the padded vocabulary (384) but not a real token
    err = capsys.readouterr().err
    assert f"{prefix}.bin: token id 300 >= the tokenizer's vocabulary size 256" in err, err


def test_regenerated_data_does_not_reuse_the_index_cache(tmp_path):
    prefix, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    kw = dict(
        split="1,0,0",
        seq_length=16,
        seed=1,
        tokenizer=tok,
        train_valid_test_num_samples=[60, None, None],
        cache_dir=cache,
    )
    write_indexed_dataset(prefix, _docs(40, 30, hi=100), vocab_size=VOCAB + 1)
    build_train_valid_test_datasets([prefix], **kw)
    # regenerated (as by preprocess_data --overwrite): fewer, shorter documents of other tokens; the old
    # cached indices point past the new documents (IndexError) or into them at old offsets
    write_indexed_dataset(prefix, _docs(12, 10, lo=150, hi=200), vocab_size=VOCAB + 1, overwrite=True)
    train, _, _ = build_train_valid_test_datasets([prefix], **kw)
    seen = set()
    for i in range(len(train)):
        seen.update(train[i]["tokens"].tolist())
    assert seen <= set(range(150, 200)) | {VOCAB} and len(seen) > 40


def test_preprocess_refuses_an_empty_dataset(tmp_path, sp_args):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(EmptyDatasetError, match=r"o_text_document: no documents to write \(2 read"):
        preprocess([path], str(tmp_path / "o"), sp_args)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o")]
    stats = preprocess([path], str(tmp_path / "o"), sp_args, allow_empty=True)
    assert stats.num_written["text"] == 0 and os.path.isfile(str(tmp_path / "o_text_document.idx"))
