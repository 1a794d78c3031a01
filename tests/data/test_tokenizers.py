import os

import pytest

from megatron_sv.data.sentencepiece_training import ROUND_TRIP_PROBE, train_sentencepiece
from megatron_sv.data.tokenizers import NO_TOKEN, build_tokenizer

TRICKY = [
    ROUND_TRIP_PROBE,
    "",
    "\n",
    "   leading and trailing   \n\n",
    "x = 1\r\n\ty = '\u2603 \U0001f600 \u00e9\u0301'\n",
    "no newline at end",
    "\x00\x07 control chars \x1b[0m\n",
]


def test_sentencepiece_round_trips_whole_python_files(sp_args, stdlib_texts):
    tok = build_tokenizer(**sp_args)
    ids = tok.tokenize_batch(stdlib_texts, num_threads=2)
    assert len(ids) == len(stdlib_texts) > 10
    for text, doc_ids in zip(stdlib_texts, ids):
        assert tok.detokenize(doc_ids) == text
    for text in TRICKY:
        assert tok.detokenize(tok.tokenize(text)) == text
    # batch and single encoding agree
    assert [tok.tokenize(t) for t in stdlib_texts[:5]] == ids[:5]


def test_sentencepiece_newline_and_indent_pieces(sp_args):
    tok = build_tokenizer(**sp_args)
    nl = tok.tokenize("\n")
    assert len(nl) == 1 and tok.id_to_piece(nl[0]) == "\n"
    # a newline is never merged with its neighbours; indentation is one whitespace-only piece
    ids = tok.tokenize("a\n        b")
    assert nl[0] in ids
    assert any(set(tok.id_to_piece(i)) == {"\u2581"} and len(tok.id_to_piece(i)) >= 4 for i in ids)
    assert (tok.eod, tok.eos, tok.bos, tok.pad) == (2, 2, 1, 3)
    assert tok.vocab_size == 600


def test_sentencepiece_training_is_deterministic(tmp_path, stdlib_texts):
    a = train_sentencepiece(stdlib_texts, str(tmp_path / "a"), vocab_size=400, input_sentence_size=3000)
    b = train_sentencepiece(stdlib_texts, str(tmp_path / "b"), vocab_size=400, input_sentence_size=3000)
    assert a.num_lines_used == 3000 < a.num_lines_seen
    assert open(a.model_file, "rb").read() == open(b.model_file, "rb").read()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_sentencepiece_training_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(["x"], str(tmp_path / "t"), vocab_size=100)
    with pytest.raises(ValueError, match="no training text"):
        train_sentencepiece(["", "\n\n"], str(tmp_path / "t"), vocab_size=400)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(corrupt))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("Llama3Tokenizer")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", merge_file=str(corrupt))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="gpt2")


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=10)
    assert tok.tokenize(" 1 2\n9 ") == [1, 2, 9]
    assert tok.detokenize([1, 2, 9]) == "1 2 9"
    assert (tok.vocab_size, tok.eod, tok.pad) == (11, 10, NO_TOKEN)
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("10")
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("a b")


@pytest.fixture(scope="module")
def byte_level_bpe(tmp_path_factory, stdlib_texts):
    """A small GPT-2 style byte-level BPE trained locally with `tokenizers`."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(stdlib_texts, vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out))
    bpe.save(str(out / "tokenizer.json"))
    return out


def test_gpt2_bpe_from_local_files(byte_level_bpe, stdlib_texts):
    tok = build_tokenizer(
        "GPT2BPETokenizer",
        vocab_file=str(byte_level_bpe / "vocab.json"),
        merge_file=str(byte_level_bpe / "merges.txt"),
    )
    assert tok.eod == 0 and tok.vocab_size == 700
    text = stdlib_texts[1]
    ids = tok.tokenize(text)
    assert len(ids) < len(text) and tok.detokenize(ids) == text
    assert tok.tokenize_batch(stdlib_texts[:3]) == [tok.tokenize(t) for t in stdlib_texts[:3]]
    bad = byte_level_bpe / "bad_vocab.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="cannot load vocab"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad), merge_file=str(byte_level_bpe / "merges.txt"))
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        build_tokenizer(
            "GPT2BPETokenizer",
            vocab_file=str(byte_level_bpe / "vocab.json"),
            merge_file=str(byte_level_bpe / "nope.txt"),
        )


def test_huggingface_tokenizer_from_local_dir_and_file(byte_level_bpe, tmp_path, stdlib_texts):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(byte_level_bpe / "tokenizer.json"), eos_token="<|endoftext|>")
    hf.save_pretrained(str(tmp_path / "hf"))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf"))
    assert tok.eod == 0 and tok.pad == NO_TOKEN
    text = stdlib_texts[2]
    assert tok.detokenize(tok.tokenize(text)) == text
    # a bare tokenizer.json has no eos token declared: refused with a clear message
    with pytest.raises(ValueError, match="no eos"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(byte_level_bpe / "tokenizer.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bad))
