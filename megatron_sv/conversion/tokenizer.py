"""The tokenizer beside a converted model: Hugging Face tokenizer files at export, and back at import.

Export writes the tokenizer a checkpoint was trained with (its recorded ``--tokenizer-type`` and
``--tokenizer-model``, or one given on the command line) as Hugging Face files, so that
``AutoTokenizer.from_pretrained(HF_DIR)`` encodes every text to the ids the model was trained on:

- ``SentencePieceTokenizer``: a fast tokenizer (``tokenizer.json``) built by transformers'
  ``SpmConverter.build_tokenizer_from_spm_proto``, which follows the model's own normalizer settings.
  Llama's converter would not do: it assumes a dummy prefix and whitespace handling that our code
  tokenizers (identity normalization, byte fallback, no dummy prefix) do not have, and would change the ids.
  The original ``.model`` is copied as ``tokenizer.model`` for sentencepiece users.
- ``HuggingFaceTokenizer``: the tokenizer is loaded and saved again (``save_pretrained``).
- ``NullTokenizer`` (synthetic data) has nothing to export; ``GPT2BPETokenizer`` is refused (give its
  Hugging Face form with ``--tokenizer-model``, or ``--no-tokenizer``).

Import copies the Hugging Face tokenizer files of the source directory into ``OUT/tokenizer/``, which
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model OUT/tokenizer`` loads for training.

transformers is imported inside the functions: it is the optional ``hf`` extra, and the tools that do not
export or import need not have it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from megatron_sv.conversion.canonical import ConversionError

# the files a Hugging Face tokenizer directory may hold (transformers' save_pretrained and sentencepiece)
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
IMPORTED_TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class TokenizerSource:
    """Which tokenizer to export: a Megatron ``--tokenizer-type`` and its file or directory."""

    tokenizer_type: str
    path: Optional[str]

    @classmethod
    def from_checkpoint_args(cls, args: Dict[str, Any], override: Optional[str] = None) -> Optional["TokenizerSource"]:
        """The training run's tokenizer, or ``override`` (a sentencepiece .model file or a Hugging Face
        tokenizer directory). None when there is nothing to export (NullTokenizer, no tokenizer recorded)."""
        if override:
            kind = (
                "SentencePieceTokenizer"
                if os.path.isfile(override) and override.endswith(".model")
                else "HuggingFaceTokenizer"
            )
            return cls(kind, override)
        kind = args.get("tokenizer_type")
        if kind in (None, "NullTokenizer"):
            return None
        return cls(kind, args.get("tokenizer_model"))

    def check(self) -> None:
        """Before any work: the file exists and the type can be exported."""
        if self.tokenizer_type == "GPT2BPETokenizer":
            raise ConversionError(
                "the checkpoint was trained with GPT2BPETokenizer, whose vocab/merges files are "
                "not exported; give its Hugging Face form with --tokenizer-model DIR, or "
                "--no-tokenizer"
            )
        if self.tokenizer_type not in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
            raise ConversionError(f"cannot export a tokenizer of type {self.tokenizer_type!r}")
        if not self.path or not os.path.exists(self.path):
            raise ConversionError(
                f"the tokenizer {self.path!r} ({self.tokenizer_type}, recorded in the checkpoint) "
                "does not exist here; pass --tokenizer-model PATH (sentencepiece .model or Hugging "
                "Face tokenizer directory), or --no-tokenizer to export the model alone"
            )


def load_hf_tokenizer(source: TokenizerSource):
    """The tokenizer as a transformers fast tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415 - the [hf] extra, only when a tokenizer is exported

    if source.tokenizer_type == "HuggingFaceTokenizer":
        if os.path.isdir(source.path):
            return AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        return PreTrainedTokenizerFast(tokenizer_file=source.path)
    return sentencepiece_to_hf(source.path)


def sentencepiece_to_hf(model_file: str):
    """A transformers fast tokenizer that encodes and decodes exactly like the sentencepiece model."""
    import sentencepiece  # noqa: PLC0415 - only when a sentencepiece tokenizer is exported (with the [hf] extra)
    from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415 - as above
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 - as above
    from transformers.convert_slow_tokenizer import SpmConverter  # noqa: PLC0415 - as above

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab: Any = [(p.piece, p.score) for p in proto.pieces]  # unigram
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise ConversionError(f"sentencepiece model {model_file!r}: unsupported model type for Hugging Face export")
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)

    def piece(i: int) -> Optional[str]:
        return sp.id_to_piece(i) if i >= 0 else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=piece(sp.unk_id()),
        bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()),
        pad_token=piece(sp.pad_id()),
        clean_up_tokenization_spaces=False,
    )


def write_hf_tokenizer(source: TokenizerSource, out_dir: str) -> Dict[str, Any]:
    """Write the tokenizer into ``out_dir`` (a model directory); return its vocabulary size and special ids."""
    tok = load_hf_tokenizer(source)
    tok.save_pretrained(out_dir)
    if source.tokenizer_type == "SentencePieceTokenizer":
        shutil.copyfile(source.path, os.path.join(out_dir, "tokenizer.model"))
    return {"vocab_size": len(tok), "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}


def hf_tokenizer_files(hf_dir: str) -> List[str]:
    """The tokenizer files in a Hugging Face model directory (empty when it has no tokenizer)."""
    names = [n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    return names if any(n in names for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")) else []


def copy_hf_tokenizer(hf_dir: str, names: List[str], out_dir: str) -> str:
    """Copy the tokenizer files into ``out_dir/tokenizer``; return that directory."""
    target = os.path.join(out_dir, IMPORTED_TOKENIZER_DIR)
    os.makedirs(target, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(target, name))
    return target
