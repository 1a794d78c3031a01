"""The distributed optimizer's state survives a save/load round trip wherever the inner optimizer is torch
Adam (no Transformer Engine / Apex, CPU or GPU): megatron-core 0.16.1 raises KeyError('step') there, which
our loader handles on its own optimizer instances without patching megatron-core."""

import torch

from tests.helpers.distributed import run_distributed


def _save_and_reload_distributed_optimizer(rank, world_size, path):
    """DP2 distributed optimizer saved in the fully_reshardable format (the gather that calls .cuda()) and
    loaded into a fresh optimizer (torch-Adam 'step' not in that format): the states come back."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_sv.checkpointing.dist import load_checkpoint, save_checkpoint
    from megatron_sv.models.gpt.reference_model import build_reference_gpt, reference_config
    from megatron_sv.platform import destroy_distributed, initialize_distributed

    unpatched = DistributedOptimizer._set_main_param_and_optimizer_states
    initialize_distributed(seed=3)
    try:
        assert DistributedOptimizer._set_main_param_and_optimizer_states is unpatched

        def make():
            cfg = reference_config(num_layers=1, hidden_size=32)
            ddp = DistributedDataParallel(
                config=cfg,
                module=build_reference_gpt(cfg, 64, 8),
                ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True),
            )
            opt = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp]
            )
            return ddp, opt

        tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(rank))

        def step(ddp, opt):
            ddp.zero_grad_buffer()
            ddp(tokens[:, :-1], torch.arange(8)[None], None, labels=tokens[:, 1:]).float().mean().backward()
            ddp.finish_grad_sync()
            opt.step()

        ddp, opt = make()
        for _ in range(2):
            step(ddp, opt)
        save_checkpoint(path, 2, [ddp], opt, optimizer_format="fully_reshardable", log=lambda *_: None)
        ddp2, opt2 = make()
        load_checkpoint(path, [ddp2], opt2, log=lambda *_: None)
        # the fix is scoped to our load: megatron-core's class and the instance are left as they were
        assert "_set_main_param_and_optimizer_states" not in vars(opt2)
        assert DistributedOptimizer._set_main_param_and_optimizer_states is unpatched
        step(ddp, opt)  # one more update: Adam's step count must have come back per parameter
        step(ddp2, opt2)
        states = lambda o: [o.optimizer.state[p] for g in o.optimizer.param_groups for p in g["params"]]  # noqa: E731
        pairs = list(zip(states(opt), states(opt2)))
        return bool(pairs) and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in pairs)
    finally:
        destroy_distributed()


def test_distributed_optimizer_fully_reshardable_checkpoint_without_te(tmp_path):
    assert run_distributed(
        _save_and_reload_distributed_optimizer, world_size=2, args=(str(tmp_path / "c"),), timeout=300
    ) == [True, True]
