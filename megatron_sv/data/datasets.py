"""GPT train/valid/test datasets from Megatron-Core's BlendedMegatronDatasetBuilder.

`data_path` follows Megatron-LM's `--data-path` syntax: a list of tokens (each string may hold
several whitespace-separated tokens), either prefixes only ("p1 p2": weights follow dataset sizes)
or weight/prefix pairs ("0.3 p1 0.7 p2"). Everything is validated before Megatron-Core sees it, so
mistakes surface as clear ValueError/FileNotFoundError instead of asserts deep in the builder.

Distributed use: call on every rank. With torch.distributed initialized, Megatron-Core builds (and
caches index files) on rank 0 first, then the other ranks load from the cache after a barrier;
ranks for which `is_built_on_rank()` is False get None. Without torch.distributed everything is
built locally.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple

_SPLIT_SEPARATORS = re.compile(r"[,/]")


def _as_float(token: str) -> Optional[float]:
    try:
        return float(token)
    except ValueError:
        return None


def parse_blend(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Parse Megatron blend syntax into (prefixes, weights or None)."""
    if isinstance(data_path, str):
        data_path = [data_path]
    tokens = [t for item in data_path for t in str(item).split()]
    if not tokens:
        raise ValueError("data_path is empty: give a dataset prefix or 'weight prefix' pairs")
    if _as_float(tokens[0]) is None:
        numeric = [t for t in tokens if _as_float(t) is not None]
        if numeric:
            raise ValueError(
                f"bad blend {' '.join(tokens)!r}: numbers {numeric} among prefixes; a weighted blend "
                "must start with a weight and alternate 'weight prefix'"
            )
        return tokens, None
    if len(tokens) % 2:
        raise ValueError(
            f"bad blend {' '.join(tokens)!r}: odd token count ({len(tokens)}); a weighted blend "
            "is 'weight prefix' pairs"
        )
    prefixes, weights = [], []
    for w, p in zip(tokens[0::2], tokens[1::2]):
        weight = _as_float(w)
        if weight is None:
            raise ValueError(f"bad blend {' '.join(tokens)!r}: weight {w!r} is not a number")
        if _as_float(p) is not None:
            raise ValueError(f"bad blend {' '.join(tokens)!r}: expected a prefix after weight {w!r}, got {p!r}")
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"bad blend {' '.join(tokens)!r}: weight {w!r} must be finite and >= 0")
        prefixes.append(p)
        weights.append(weight)
    if sum(weights) <= 0:
        raise ValueError(f"bad blend {' '.join(tokens)!r}: weights sum to zero")
    return prefixes, weights


def parse_split(split: str) -> List[float]:
    """Validate a split like "969,30,1" (1 to 3 non-negative numbers, positive sum) and return
    the normalized fractions for train, valid, test."""
    parts = [p.strip() for p in _SPLIT_SEPARATORS.split(str(split))]
    if not 1 <= len(parts) <= 3 or any(p == "" for p in parts):
        raise ValueError(f"bad split {split!r}: expected 1 to 3 comma-separated numbers, e.g. '969,30,1'")
    values = [_as_float(p) for p in parts]
    if any(v is None or not v >= 0 or v == float("inf") for v in values):
        raise ValueError(f"bad split {split!r}: every part must be a finite number >= 0")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"bad split {split!r}: parts sum to zero")
    values += [0.0] * (3 - len(values))
    return [v / total for v in values]


def check_dataset_files(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f" (give the prefix without the extension: {prefix[:-4]!r})"
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"dataset {prefix!r}: missing {', '.join(missing)}{hint}")


def default_is_built_on_rank() -> bool:
    """Megatron-LM's rule: build on tensor-parallel rank 0 of the first and last pipeline stages
    (the stages that consume tokens/labels); everywhere when model parallelism is not set up."""
    from megatron.core import parallel_state  # noqa: PLC0415 - the flag validation imports this module torch-free

    if not parallel_state.model_parallel_is_initialized():
        return True
    first_or_last = parallel_state.is_pipeline_first_stage(ignore_virtual=True) or (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    )
    return parallel_state.get_tensor_model_parallel_rank() == 0 and first_or_last


def _builder_class():
    """Megatron-Core's builder, with one fix for single-process use.

    megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() on a cache miss
    whenever path_to_cache is set, which raises without a process group. Without one we hand the
    BlendedDataset a config copy without a cache path: its blending index is recomputed (in C++,
    milliseconds) instead of cached; the GPT datasets still use the cache directory.
    """
    import torch  # noqa: PLC0415 - the flag validation imports this module torch-free
    from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: PLC0415 - as above
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: PLC0415 - as above

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *rest, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                args = (*rest, config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)

    return Builder


def build_train_valid_test_datasets(
    data_path: Optional[Sequence[str]],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    train_valid_test_num_samples: Sequence[Optional[int]],
    mock: bool = False,
    cache_dir: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
):
    """Return (train, valid, test) GPTDataset/BlendedDataset objects (None for empty splits or
    on ranks that do not build). Each sample is a dict with tokens, labels, loss_mask,
    position_ids (and attention_mask), as Megatron-Core's GPTDataset returns it."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset  # noqa: PLC0415 - the flag validation imports this module torch-free

    # lazy like the line above: the flag validation imports this module's parsers without numpy/torch
    from megatron_sv.data.verify import check_datasets, data_stamp  # noqa: PLC0415 - numpy too: as above

    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples needs 3 entries (train, valid, test)")
    if tokenizer is None:
        raise ValueError("a tokenizer is required (its eod/pad ids shape the samples)")
    parse_split(split)
    if mock:
        blend = None
    else:
        if not data_path:
            raise ValueError("data_path is required unless mock=True")
        blend = parse_blend(data_path)
        check_dataset_files(blend[0])
        check_datasets(blend[0], tokenizer.vocab_size)
        # the index cache (document/sample/shuffle indices) is keyed by the files' size and modification
        # time too: regenerated data must not reuse the indices of the old files
        base = cache_dir or os.path.join(os.path.dirname(os.path.abspath(blend[0][0])), "cache")
        cache_dir = os.path.join(base, f"data-{data_stamp(blend[0])}")

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=None if mock else split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    cls = MockGPTDataset if mock else GPTDataset
    builder = _builder_class()(
        cls,
        list(train_valid_test_num_samples),
        is_built_on_rank or default_is_built_on_rank,
        config,
    )
    train, valid, test = builder.build()
    return train, valid, test
