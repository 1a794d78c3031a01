import json
import os

import pytest

from megatron_sv.data.corpus import iter_stdlib_documents
from megatron_sv.data.sentencepiece_training import train_sentencepiece

# Inductor's warm compile pool (started when megatron.core imports torch._inductor) is not needed.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def stdlib_texts():
    """A small slice of the embedded stdlib corpus (about 300 kB of real code)."""
    return [text for _, text in iter_stdlib_documents(max_bytes=300_000)]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, stdlib_texts):
    prefix = str(tmp_path_factory.mktemp("sp") / "tok")
    train_sentencepiece(stdlib_texts, prefix, vocab_size=600, input_sentence_size=20_000, num_threads=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def sp_args(sp_model):
    return {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": sp_model}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)
