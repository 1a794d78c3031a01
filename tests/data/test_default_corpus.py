import io
import os

from megatron_sv.data.corpus import stdlib_python_files
from megatron_sv.data.default_corpus import prepare_default_corpus
from megatron_sv.data.indexed import is_valid_indexed_dataset


def test_stdlib_file_list_is_sorted_and_excludes_site_packages():
    files = stdlib_python_files()
    assert len(files) > 500 and files == sorted(files)
    assert not [f for f in files if "site-packages" in f.split("/")]


def test_prepare_default_corpus_is_idempotent(tmp_path):
    log = io.StringIO()
    kw = dict(vocab_size=400, max_bytes=150_000, input_sentence_size=5000, workers=1, log=log)
    m = prepare_default_corpus(str(tmp_path), **kw)
    assert is_valid_indexed_dataset(m["data_prefix"]) and m["num_tokens"] > 1000
    stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in os.listdir(tmp_path)}
    assert prepare_default_corpus(str(tmp_path), **kw)["num_tokens"] == m["num_tokens"]
    assert "reusing" in log.getvalue()
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in stamps if f != "manifest.json"} == {
        f: t for f, t in stamps.items() if f != "manifest.json"
    }
    # a truncated .bin is detected and rebuilt
    with open(m["data_prefix"] + ".bin", "r+b") as f:
        f.truncate(10)
    prepare_default_corpus(str(tmp_path), **kw)
    assert is_valid_indexed_dataset(m["data_prefix"])
