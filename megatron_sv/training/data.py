"""Training data: tokenizer, Megatron-Core GPT datasets and a deterministic, resumable sampler.

Global batch ``k`` is the samples ``[k*G, (k+1)*G)`` of the train dataset (G = --global-batch-size;
Megatron-Core's GPTDataset already shuffles documents and samples with --seed). Data-parallel rank
``r`` reads the contiguous block ``[k*G + r*M*A, k*G + (r+1)*M*A)`` as A micro-batches of M samples.
Every rank builds the (memory-mapped) datasets itself, so tensor- and pipeline-parallel peers of a
data-parallel rank read exactly the same samples without a broadcast. Resuming from ``consumed``
samples continues with global batch ``consumed / G``: an interrupted run sees the same data as an
uninterrupted one.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch

from megatron_sv.data.datasets import build_train_valid_test_datasets
from megatron_sv.data.tokenizers import build_tokenizer


class MicroBatchSampler(torch.utils.data.Sampler):
    """Yields this data-parallel rank's micro-batches (lists of sample indices), global batch after
    global batch, starting at ``consumed_samples``."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        num_microbatches: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.nmb = num_microbatches
        self.per_rank = micro_batch_size * num_microbatches
        self.global_batch = self.per_rank * data_parallel_size
        self.dp_rank = data_parallel_rank
        if consumed_samples % self.global_batch:
            raise ValueError(
                f"consumed samples {consumed_samples} is not a multiple of the global batch "
                f"{self.global_batch}; the global batch size changed since the checkpoint?"
            )

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // self.global_batch) * self.nmb

    def __iter__(self) -> Iterator[List[int]]:
        start = self.consumed
        while start + self.global_batch <= self.total:
            base = start + self.dp_rank * self.per_rank
            for m in range(self.nmb):
                yield list(range(base + m * self.mbs, base + (m + 1) * self.mbs))
            start += self.global_batch


def build_tokenizer_from_args(args):
    return build_tokenizer(
        args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
    )


def build_datasets(args, tokenizer):
    """(train, valid) datasets sized for the whole run; every rank builds its own view."""
    train_samples = args.train_iters * args.global_batch_size
    valid_samples = args.eval_iters * args.global_batch_size
    train, valid, _ = build_train_valid_test_datasets(
        args.data_path,
        args.split,
        args.seq_length,
        args.seed,
        tokenizer,
        [train_samples, valid_samples if valid_samples else None, None],
        mock=args.mock_data,
        cache_dir=args.data_cache_path,
        is_built_on_rank=lambda: True,
        create_attention_mask=False,
    )
    if train is None or len(train) < train_samples:
        raise RuntimeError(
            f"the train split holds {0 if train is None else len(train)} samples, {train_samples} needed"
        )
    if valid_samples and (valid is None or len(valid) < valid_samples):
        raise RuntimeError(
            f"the validation split holds {0 if valid is None else len(valid)} samples, "
            f"{valid_samples} needed (--eval-iters x --global-batch-size)"
        )
    return train, valid


def micro_batches(
    dataset, sampler: MicroBatchSampler, num_workers: int = 0, device: Optional[torch.device] = None
) -> Iterator[dict]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
    )
    for batch in loader:
        if device is not None and device.type != "cpu":
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        yield batch
