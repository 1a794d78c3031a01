"""torch_dist checkpoints of scale-vector models saved at TP2 / PP2 / EP2 load at TP1 with identical logits."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.parity import SEQ, VOCAB, train_steps
from tests.scale_vectors.test_parallel_equivalence import build_sv_model

TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def full_logits(model) -> torch.Tensor:
    """Logits of TOKENS on every rank of this model-parallel layout (None off the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    pos = torch.arange(SEQ)[None].expand_as(TOKENS)
    model.eval()
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() > 1:
            shape = (SEQ, TOKENS.shape[0], model.config.hidden_size)
            if ps.is_pipeline_first_stage():
                hidden = model(TOKENS, pos, None)
                torch.distributed.send(hidden.contiguous(), ps.get_pipeline_model_parallel_next_rank())
                return None
            hidden = torch.empty(shape)
            torch.distributed.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(TOKENS, pos, None)
        return gather_from_tensor_model_parallel_region(out).clone()


def _save_and_logits(model, path):
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    return full_logits(model)


STRATEGIES = ["dp", "unified"]


CASES = {
    "tp2": ({"tp": 2}, dict(micro_batch_size=2), False),
    "pp2": ({"pp": 2}, dict(micro_batch_size=1, num_microbatches=2), False),
    "ep2": ({"ep": 2}, dict(micro_batch_size=1), True),
}


def _train_and_save(rank, world_size, root):
    """Every case and strategy in one spawned job (start-up dominates)."""
    from megatron_sv.platform import destroy_distributed

    out = {}
    for case, (parallel, run_kwargs, moe) in CASES.items():
        for strategy in STRATEGIES:
            res = train_steps(
                parallel,
                build_model=functools.partial(build_sv_model, strategy=strategy, moe=moe),
                steps=2,
                finish=functools.partial(_save_and_logits, path=f"{root}/{case}/{strategy}"),
                keep_process_group=True,
                **run_kwargs,
            )
            out[(case, strategy)] = res["finish"]
    destroy_distributed()
    return out


def _load_at_tp1(rank, world_size, root):
    from megatron.core import dist_checkpointing

    from megatron_sv.platform import destroy_distributed, initialize_distributed

    initialize_distributed(seed=99)
    try:
        out = {}
        for case, (_, _, moe) in CASES.items():
            for strategy in STRATEGIES:
                _, model = build_sv_model({}, strategy, moe=moe, seed=99)  # different init: all from disk
                path = f"{root}/{case}/{strategy}"
                model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
                out[(case, strategy)] = full_logits(model)
        return out
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def saved_and_loaded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    saved = run_distributed(_train_and_save, world_size=2, args=(root,), timeout=600)
    return saved, run_distributed(_load_at_tp1, world_size=1, args=(root,), timeout=600)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_saved_sharded_loads_at_tp1(saved_and_loaded, case):
    saved, loaded = saved_and_loaded
    for strategy in STRATEGIES:
        before = saved[-1][(case, strategy)]  # the last rank holds the last stage's logits
        after = loaded[(case, strategy)]
        assert before is not None
        assert torch.allclose(after, before, rtol=0, atol=1e-6), (strategy, (after - before).abs().max())
