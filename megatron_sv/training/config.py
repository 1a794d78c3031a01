"""What a validated command line is: ``TrainingConfig``, returned by ``arguments.validate_args``.

The model and the method are typed (``shape()``: GPTShape, ``sv_config``: ScaleVectorConfig, both built
from their one declaration); Megatron-LM's other flags (optimizer, schedule, data, checkpointing, logging)
are read from ``args``, the resolved flags: conditional defaults filled in and derived sizes added
(data-parallel size, micro-batches per step, ...), as Megatron-LM's own ``args`` carries them. Nothing
mutates a config after validation; ``with_vocab`` returns a new one once the tokenizer is known.

Imports neither torch nor megatron.core.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from megatron_sv.models.gpt.shape import GPTShape, padded_vocab_size
from megatron_sv.scale_vectors.config import ScaleVectorConfig


@dataclass(frozen=True)
class TrainingConfig:
    args: argparse.Namespace  # the resolved flags (what a checkpoint saves), never changed after validation
    sv_config: ScaleVectorConfig
    fp8: Optional[Any] = None  # fp8.recipe.FP8Recipe of the local backend's FP8 linears (--fp8-format)
    padded_vocab_size: Optional[int] = None  # known once the tokenizer is loaded (with_vocab)
    start_time: float = field(default_factory=time.time)

    def __getattr__(self, name: str) -> Any:
        """A flag that is not a typed field reads from the resolved flags (``cfg.lr``, ``cfg.save``)."""
        if name.startswith("__") or name == "args":  # copy/pickle probe before the fields exist
            raise AttributeError(name)
        try:
            return getattr(self.args, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no field or flag {name!r}") from None

    def with_vocab(self, tokenizer_vocab_size: int) -> "TrainingConfig":
        """The config for a tokenizer of this size: the embedding's rows padded as Megatron-LM pads them."""
        padded = padded_vocab_size(
            tokenizer_vocab_size, self.args.make_vocab_size_divisible_by, self.args.tensor_model_parallel_size
        )
        return dataclasses.replace(self, padded_vocab_size=padded)

    def shape(self) -> GPTShape:
        """The model's architecture, from the same declaration the flags came from."""
        if self.padded_vocab_size is None:
            raise ValueError("the padded vocabulary is not known yet (TrainingConfig.with_vocab)")
        return GPTShape.from_saved(self.saved_args())

    def saved_args(self) -> Dict[str, Any]:
        """The flags as plain types (loadable with torch.load(weights_only=True)): a checkpoint's saved args,
        read back by the resume check and the conversion tools."""
        out: Dict[str, Any] = {}
        for k, v in vars(self.args).items():
            if k.startswith("_"):
                continue
            if isinstance(v, (bool, int, float, str)) or v is None:
                out[k] = v
            elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
                out[k] = list(v)
        if self.padded_vocab_size is not None:
            out["padded_vocab_size"] = self.padded_vocab_size
        return out
