"""Hugging Face <-> megatron_sv checkpoint conversion and scale-vector re-parameterization
(tools/convert_checkpoint.py; docs/conversion.md)."""

from megatron_sv.conversion.canonical import ConversionError
from megatron_sv.conversion.convert import convert_megatron, export_to_hf, import_from_hf

__all__ = ["ConversionError", "convert_megatron", "export_to_hf", "import_from_hf"]
