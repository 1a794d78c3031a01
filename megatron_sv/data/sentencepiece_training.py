"""Train a sentencepiece BPE model that round-trips source code exactly.

Sentencepiece trains on lines (whole files exceed its maximum sentence length), so "\\n" never
appears in training text. We make "\\n" a user-defined piece: at encode time a newline is always
one token and never merged, and every other character is kept verbatim by the identity
normalization, no whitespace collapsing, no dummy prefix and byte fallback for unseen characters.
Whitespace-only pieces are allowed, so indentation ("    ") becomes one token.

The training sample is chosen here, deterministically (seeded), rather than by sentencepiece's own
shuffle, so the same inputs always give the same model.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import sentencepiece

# Text the trained model must reproduce exactly after encode/decode.
ROUND_TRIP_PROBE = (
    "def f(x):\n\tif x  >  1:\r\n        return 'é✓ \u00a0中'  # trailing   \n\n\n  \nclass A:\n    pass\n"
)


@dataclass
class SentencePieceTrainingResult:
    model_file: str
    vocab_size: int
    num_lines_seen: int
    num_lines_used: int


def _lines_of(texts: Iterable[str], max_line_bytes: int) -> Iterable[str]:
    for text in texts:
        for line in text.split("\n"):
            if line and len(line.encode("utf-8")) <= max_line_bytes:
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int = 8000,
    input_sentence_size: int = 1_000_000,
    seed: int = 1234,
    num_threads: Optional[int] = None,
    character_coverage: float = 0.9999,
    max_line_bytes: int = 16384,
    user_defined_symbols: Sequence[str] = (),
    verify_texts: Sequence[str] = (),
) -> SentencePieceTrainingResult:
    """Train a BPE model on the lines of `texts`; write `{model_prefix}.model` and `.vocab`.

    At most `input_sentence_size` lines (a seeded uniform sample, reservoir-style so memory stays
    bounded) are used. Special ids: unk=0, bos=1, eos=2 (the end-of-document token), pad=3.
    After training, the model must round-trip `ROUND_TRIP_PROBE` and every text in `verify_texts`
    exactly, else ValueError.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} too small: byte fallback alone needs 256 + 5 pieces")
    if input_sentence_size <= 0:
        raise ValueError("input_sentence_size must be positive")

    rng = random.Random(seed)
    sample: List[str] = []
    seen = 0
    for line in _lines_of(texts, max_line_bytes):
        seen += 1
        if len(sample) < input_sentence_size:
            sample.append(line)
        else:
            j = rng.randrange(seen)
            if j < input_sentence_size:
                sample[j] = line
    if not sample:
        raise ValueError("no training text: every input line was empty")

    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            byte_fallback=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=False,
            user_defined_symbols=["\n", *user_defined_symbols],
            character_coverage=character_coverage,
            max_sentence_length=max_line_bytes,
            input_sentence_size=0,  # we sampled already
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e}") from e

    proto = model.getvalue()
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    for text in (ROUND_TRIP_PROBE, *verify_texts):
        if sp.decode(sp.encode(text)) != text:
            raise ValueError(f"trained model does not round-trip {text[:80]!r}")

    # Write atomically: a half-written .model must never be mistaken for a good one.
    for suffix, data in ((".vocab", _vocab_text(sp)), (".model", proto)):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, model_prefix + suffix)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return SentencePieceTrainingResult(model_prefix + ".model", sp.get_piece_size(), seen, len(sample))


def _vocab_text(sp) -> bytes:
    rows = (f"{sp.id_to_piece(i)!r}\t{sp.get_score(i)}" for i in range(sp.get_piece_size()))
    return ("\n".join(rows) + "\n").encode("utf-8")
