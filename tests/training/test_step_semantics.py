"""One training step of the real Trainer (2 gloo ranks, DP2, 2 micro-batches each), checked in-process:

* the loss is token-weighted (sum of masked token losses / loss tokens over all micro-batches and
  data-parallel ranks), and so are the reduced gradients, against a direct computation with uneven masks;
* non-finite gradients (finite loss) stop the step before the optimizer applies anything.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.training.cli import TINY

SEQ, GLOBAL_BATCH, MICRO = 32, 8, 2  # TINY: seq 32, global batch 8, micro-batch 2 -> 2 micro-batches at DP2


def _global_batch():
    g = torch.Generator().manual_seed(11)
    data = torch.randint(0, 255, (GLOBAL_BATCH, SEQ + 1), generator=g)
    # very uneven loss masks: from 1 to all SEQ tokens per sample, two samples fully masked out
    counts = [1, SEQ, 5, 0, 17, 3, SEQ - 2, 0]
    mask = torch.zeros(GLOBAL_BATCH, SEQ)
    for i, c in enumerate(counts):
        mask[i, torch.randperm(SEQ, generator=g)[:c]] = 1.0
    return data[:, :-1].contiguous(), data[:, 1:].contiguous(), mask


def _batches(tokens, labels, mask, rows):
    pos = torch.arange(SEQ).unsqueeze(0)
    return [
        {
            "tokens": tokens[i : i + MICRO],
            "labels": labels[i : i + MICRO],
            "loss_mask": mask[i : i + MICRO],
            "position_ids": pos.expand(MICRO, SEQ).contiguous(),
        }
        for i in range(rows.start, rows.stop, MICRO)
    ]


def _trainer(extra):
    from megatron_sv.platform import initialize_distributed
    from megatron_sv.training.arguments import parse_args, validate_args
    from megatron_sv.training.data import build_tokenizer_from_args
    from megatron_sv.training.loop import Trainer

    config = validate_args(parse_args([*TINY, "--train-iters", "2", *extra]), world_size=2)
    tok = build_tokenizer_from_args(config.args)
    config = config.with_vocab(tok.vocab_size)
    initialize_distributed(seed=config.seed)
    trainer = Trainer(config, tok)
    trainer.build_model()
    trainer.build_optimizer()
    return trainer


def _job(rank, world_size):
    from megatron_sv.platform import destroy_distributed
    from megatron_sv.training.loop import TrainingDivergedError

    out = {}
    try:
        tokens, labels, mask = _global_batch()
        per_rank = GLOBAL_BATCH // world_size
        mine = _batches(tokens, labels, mask, range(rank * per_rank, (rank + 1) * per_rank))

        # -- token-weighted loss and gradients ----------------------------------------------------------
        t = _trainer([])
        module = t.model.module
        params = [p for p in module.parameters() if p.requires_grad]
        # the direct computation on the whole global batch, on this rank's replica (autograd.grad leaves
        # DDP's gradient buffers alone)
        pos = torch.arange(SEQ).unsqueeze(0).expand(GLOBAL_BATCH, SEQ)
        token_losses = module(tokens, pos, None, labels=labels).float()
        direct = (token_losses * mask).sum() / mask.sum()
        direct_grads = torch.autograd.grad(direct, params)
        captured = {}
        step = t.optimizer.step

        def capture_then_step():
            captured["grads"] = [p.main_grad.detach().clone() for p in params]
            return step()

        t.optimizer.step = capture_then_step
        loss, _ = t.train_step(mine)
        out["loss"], out["direct"] = loss, float(direct)
        out["grad_pairs"] = [(a, b) for a, b in zip(captured["grads"], direct_grads)]
        torch.distributed.barrier()
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()

        # -- NaN gradients: stop before the update ------------------------------------------------------
        t = _trainer(["--inject-nan-at-iteration", "1"])
        before = {n: p.detach().clone() for n, p in t.model.module.named_parameters()}
        try:
            t.train_step(mine)
            out["nan"] = "no error"
        except TrainingDivergedError as e:
            out["nan"] = str(e)
        out["unchanged"] = all(torch.equal(before[n], p) for n, p in t.model.module.named_parameters())
        subs = getattr(t.optimizer, "chained_optimizers", [t.optimizer])
        out["optimizer_untouched"] = all(len(st) == 0 for sub in subs for st in sub.optimizer.state.values())
        return out
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, world_size=2, timeout=600)


def test_loss_is_token_weighted_over_micro_batches_and_dp_ranks(results):
    for r in results:
        assert r["loss"] == pytest.approx(r["direct"], rel=1e-6)


def test_gradients_are_those_of_the_token_weighted_loss(results):
    for r in results:
        assert r["grad_pairs"]
        for got, want in r["grad_pairs"]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_nan_gradient_stops_the_step_before_the_update(results):
    for r in results:
        assert "iteration 1: non-finite (NaN/Inf) gradients before the optimizer step" in r["nan"], r["nan"]
        assert r["unchanged"] and r["optimizer_untouched"]
