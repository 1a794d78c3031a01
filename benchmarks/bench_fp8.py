"""FP8 (torch._scaled_mm, local backend) against bf16: tokens/s and peak memory at 0.5B and 1B shapes.

Not a test; run by benchmarks/gpu_check.sh on one GPU (world size 1). For each shape, ``standard`` and
``unified`` are built in bf16 mixed precision with bf16 GEMMs and with FP8 GEMMs (tensorwise and rowwise
scaling), trained with the training loop's hooks (fold and FP8 weight cast once per step) and timed in
interleaved rounds (round-robin, so drift hits all alike); ratios are medians of per-round ratios. Peak
memory is torch.cuda.max_memory_allocated of one model alone (built, stepped twice, freed).
Goals: FP8 >= 1.3x bf16 tokens/s; unified <= 1.04x standard's step time in FP8.

    python benchmarks/bench_fp8.py                         # 0.5b and 1b on a GPU
    python benchmarks/bench_fp8.py --shapes tiny --rounds 1   # CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# layers, hidden, heads, query groups, ffn (SwiGLU), vocab: every FP8 GEMM size a multiple of 16
SHAPES = {
    "0.5b": dict(
        num_layers=24,
        hidden_size=1280,
        num_attention_heads=20,
        num_query_groups=4,
        ffn_hidden_size=3456,
        vocab_size=32768,
    ),
    "1b": dict(
        num_layers=20,
        hidden_size=2048,
        num_attention_heads=16,
        num_query_groups=4,
        ffn_hidden_size=5632,
        vocab_size=32768,
    ),
    "tiny": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, vocab_size=512
    ),
}
PRECISIONS = {"bf16": None, "fp8-tensorwise": ("hybrid", "tensorwise"), "fp8-rowwise": ("hybrid", "rowwise")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["0.5b", "1b"], choices=list(SHAPES))
    p.add_argument("--strategies", nargs="+", default=["standard", "unified"])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def init():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    from megatron_sv.platform import initialize_distributed

    initialize_distributed(seed=1234)


def build(args, shape_name: str, strategy: str, precision: str):
    from megatron_sv.fp8.recipe import FP8Recipe, check_fp8_device
    from megatron_sv.models.gpt.model import GPTShape, ParallelLayout, build_gpt_model, transformer_config
    from megatron_sv.platform import current_device
    from megatron_sv.scale_vectors.config import strategy_config

    shape = GPTShape(seq_length=args.seq_length, **SHAPES[shape_name])
    cfg = transformer_config(shape, ParallelLayout(bf16=True))
    fp8 = FP8Recipe(*PRECISIONS[precision]) if PRECISIONS[precision] else None
    if fp8 is not None:
        check_fp8_device(current_device())
    model = build_gpt_model(shape, strategy_config(strategy), cfg, init_seed=1234, fp8=fp8).to(current_device())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    return model, opt


def train_step(model, opt, batches):
    from megatron_sv.scale_vectors import training_hooks

    pos = torch.arange(batches[0][0].shape[1], device=batches[0][0].device)[None]
    opt.zero_grad(set_to_none=True)
    for tokens, labels in batches:
        (model(tokens, pos, None, labels=labels).float().mean() / len(batches)).backward()
    training_hooks.gradients_ready([model])  # the step's fold chain rule
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    training_hooks.after_parameters_changed([model], opt)  # the next step re-folds and re-casts


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batches(args, vocab, device):
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, vocab, (args.num_microbatches, args.micro_batch_size, args.seq_length + 1), generator=g)
    return [(b[:, :-1].contiguous().to(device), b[:, 1:].contiguous().to(device)) for b in t]


def peak_memory(args, shape_name, strategy, precision, data) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, opt = build(args, shape_name, strategy, precision)
    for _ in range(2):
        train_step(model, opt, data)
    _sync()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def bench_shape(args, shape_name, results):
    from megatron_sv.platform import current_device

    device = current_device()
    data = batches(args, SHAPES[shape_name]["vocab_size"], device)
    names = [(s, p) for p in args.precisions for s in args.strategies]
    memory = {f"{p}-{s}": peak_memory(args, shape_name, s, p, data) for s, p in names}
    built = {f"{p}-{s}": build(args, shape_name, s, p) for s, p in names}
    for m in built.values():  # warm-up: kernels, allocator, optimizer state
        train_step(*m, data)
    times = {n: [] for n in built}
    for _ in range(args.rounds):
        for n, m in built.items():
            _sync()
            t0 = time.perf_counter()
            for _ in range(args.steps_per_round):
                train_step(*m, data)
            _sync()
            times[n].append((time.perf_counter() - t0) / args.steps_per_round)
    tokens = args.num_microbatches * args.micro_batch_size * args.seq_length
    out = {"models": {}, "ratios": {}}
    print(
        f"{shape_name}: {tokens} tokens/step, {args.rounds} interleaved rounds x {args.steps_per_round} steps",
        flush=True,
    )
    for n in built:
        t = statistics.median(times[n])
        out["models"][n] = {"step_s": t, "tokens_per_s": tokens / t, "peak_gib": memory[n]}
        print(f"  {n:28s} {1000 * t:9.1f} ms/step {tokens / t:11.0f} tok/s  peak {memory[n]:7.2f} GiB", flush=True)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    for s in args.strategies:
        for p in args.precisions:
            if p != "bf16" and "bf16" in args.precisions:
                out["ratios"][f"{s}: {p} tokens/s over bf16"] = ratio(f"bf16-{s}", f"{p}-{s}")
    if "standard" in args.strategies and "unified" in args.strategies:
        for p in args.precisions:
            out["ratios"][f"{p}: unified/standard step time"] = ratio(f"{p}-unified", f"{p}-standard")
    for k, v in out["ratios"].items():
        print(f"  ratio {k:45s} {v:.3f}x", flush=True)
    results[shape_name] = out
    del built
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    init()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"bench_fp8 on {device}: FP8 via torch._scaled_mm vs bf16 (goal FP8 >= 1.3x tokens/s; "
        f"unified <= 1.04x standard in FP8)",
        flush=True,
    )
    results = {"args": vars(args), "device": device}
    for shape_name in args.shapes:
        t0 = time.time()
        bench_shape(args, shape_name, results)
        print(f"[{shape_name}: {time.time() - t0:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
