"""Train the baseline GPT for a few steps on fixed synthetic data and print the losses.

    python examples/parity_demo.py                            # 1 rank, TP1
    torchrun --nproc-per-node 2 examples/parity_demo.py       # 2 ranks, TP2 (gloo on CPU)
    torchrun --nproc-per-node 2 examples/parity_demo.py --sequence-parallel

The same seed and data give the same per-step losses (fp32) at any tensor-parallel size.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sv.models.gpt.reference_model import build_reference_gpt, reference_config
    from megatron_sv.platform import current_device, destroy_distributed, initialize_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
    initialize_distributed(tensor_model_parallel_size=world, seed=42)
    vocab, seq, mbs = 128, 16, 2
    config = reference_config(tensor_model_parallel_size=world, sequence_parallel=args.sequence_parallel and world > 1)
    model = build_reference_gpt(config, vocab_size=vocab, max_sequence_length=seq)
    device = current_device()
    model.to(device)  # weights are created on the CPU (use_cpu_initialization)
    model = DistributedDataParallel(
        config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model
    )
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-2, clip_grad=1.0), [model])
    for group in optimizer.param_groups:
        group["lr"] = 1e-2

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place

    def forward_step(data_iterator, model):
        tokens, labels = (t.to(device) for t in next(data_iterator))
        pos = torch.arange(seq, device=device).unsqueeze(0).expand_as(tokens)
        return model(tokens, pos, None, labels=labels), loss_func

    rank = torch.distributed.get_rank()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 + step)
        data = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([(data[:, :-1], data[:, 1:])]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=mbs,
        )
        optimizer.step()
        if rank == 0:
            print(
                f"step {step} tp {parallel_state.get_tensor_model_parallel_world_size()} "
                f"loss {out[0]['lm loss'].item():.6f}",
                flush=True,
            )
    destroy_distributed()


if __name__ == "__main__":
    main()
