"""GPU check of the backends: bf16 vs FP8 loss agreement and throughput ratios, in one process.

Not a test; for a GPU machine with Transformer Engine (benchmarks/gpu_check.sh covers machines without
it): one GPU, single process, NCCL, world size 1.

  1. FP8 (Transformer Engine only): ``standard`` and ``unified`` trained for --steps steps in bf16 and
     in FP8 from the same weights on the same data; prints the loss curves' differences. Without TE it
     prints "FP8: Transformer Engine not available, skipped" and does nothing else for FP8.
  2. Throughput: every model (local bf16 standard/unified; with TE also TE bf16 and TE FP8) timed in
     interleaved rounds (round-robin, so clock/thermal drift hits all alike); ratios are medians over
     rounds of the per-round ratios. Prints tokens/s, MFU and the ratios unified/standard (per backend)
     and TE/local.

Data: bytes of the Python standard library's .py files (a real, learnable corpus on every machine),
random windows drawn from a fixed seed, so every model sees the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM parts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="training steps for the bf16/FP8 loss comparison")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=4)
    p.add_argument(
        "--fp8-recipe", default=os.environ.get("FP8_RECIPE", "tensorwise"), choices=["tensorwise", "delayed"]
    )
    p.add_argument("--strategies", nargs="+", default=["standard", "unified"])
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def init():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from megatron_sv.platform import initialize_distributed

    initialize_distributed(seed=1234)
    print("backend:", torch.distributed.get_backend(), "| device:", torch.cuda.get_device_name(), flush=True)


class ByteCorpus:
    """Byte tokens of the stdlib .py files; fixed-seed random windows (same for every model)."""

    def __init__(self, limit_bytes: int = 64 << 20):
        root = sysconfig.get_paths()["stdlib"]
        chunks, total = [], 0
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                if f.endswith(".py") and total < limit_bytes:
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        b = fh.read()
                    chunks.append(b)
                    total += len(b)
        self.data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()

    def batches(self, seed: int, num: int, mbs: int, seq: int, device):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            starts = torch.randint(0, self.data.numel() - seq - 1, (mbs,), generator=g)
            t = torch.stack([self.data[s : s + seq + 1] for s in starts.tolist()]).to(device)
            out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        return out


def build(args, strategy: str, impl: str, fp8: bool):
    from megatron_sv.models.gpt.model import GPTShape, ParallelLayout, build_gpt_model, transformer_config
    from megatron_sv.scale_vectors.config import strategy_config

    shape = GPTShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=args.vocab_size,
        seq_length=args.seq_length,
    )
    extra = dict(fp8="hybrid", fp8_recipe=args.fp8_recipe) if fp8 else {}
    cfg = transformer_config(shape, ParallelLayout(bf16=True), **extra)
    torch.manual_seed(1234)  # same weights for every backend/precision of a strategy
    model = build_gpt_model(shape, strategy_config(strategy), cfg, init_seed=1234, transformer_impl=impl).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    return model, opt


def train_step(model, opt, batches) -> float:
    pos = torch.arange(batches[0][0].shape[1], device=batches[0][0].device)[None]
    opt.zero_grad(set_to_none=True)
    model.set_is_first_microbatch()  # TE: quantize (folded) weights once per step, reuse in later micro-batches
    total = torch.zeros((), device=batches[0][0].device)
    for tokens, labels in batches:
        loss = model(tokens, pos, None, labels=labels).float().mean() / len(batches)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return total


def flops_per_token(args) -> float:
    """Megatron's accounting: 6 x (non-embedding params incl. LM head) + attention (causal not halved)."""
    d, L, f, s = args.hidden_size, args.num_layers, args.ffn_hidden_size, args.seq_length
    kv = d // args.num_attention_heads * args.num_query_groups
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f
    return 6.0 * (L * per_layer + d * args.vocab_size) + 12.0 * L * d * s


def fp8_agreement(args, corpus, results):
    from megatron_sv.scale_vectors.te_linears import transformer_engine_status

    ok, reason = transformer_engine_status()
    if not ok:
        print(f"FP8: Transformer Engine not available, skipped ({reason})", flush=True)
        results["fp8"] = {"skipped": reason}
        return
    results["fp8"] = {}
    for strategy in args.strategies:
        curves = {}
        for prec in ("bf16", "fp8"):
            model, opt = build(args, strategy, "transformer_engine", fp8=(prec == "fp8"))
            losses = []
            for step in range(args.steps):
                b = corpus.batches(1000 + step, args.num_microbatches, args.micro_batch_size, args.seq_length, "cuda")
                losses.append(train_step(model, opt, b))
            curves[prec] = [float(x) for x in losses]
            del model, opt
            torch.cuda.empty_cache()
        bf, f8 = curves["bf16"], curves["fp8"]
        tail = slice(max(0, len(bf) - 10), len(bf))
        diff = [abs(a - b) for a, b in zip(bf, f8)]
        rel_tail = statistics.mean(diff[tail]) / statistics.mean(bf[tail])
        verdict = "AGREE" if rel_tail < 0.02 else "DISAGREE"
        print(
            f"FP8 {strategy}: loss bf16 {bf[0]:.3f} -> {bf[-1]:.4f}, fp8 {f8[0]:.3f} -> {f8[-1]:.4f}; "
            f"mean |diff| last 10 steps {statistics.mean(diff[tail]):.4f} ({100 * rel_tail:.2f}%), "
            f"max |diff| {max(diff):.4f}: {verdict} (threshold 2%)",
            flush=True,
        )
        results["fp8"][strategy] = {"bf16": bf, "fp8": f8, "rel_tail_diff": rel_tail, "verdict": verdict}


def throughput(args, corpus, results):
    from megatron_sv.scale_vectors.te_linears import transformer_engine_status

    te_ok, _ = transformer_engine_status()
    variants = [("local", False)] + ([("transformer_engine", False), ("transformer_engine", True)] if te_ok else [])
    names, built = [], {}
    for impl, fp8 in variants:
        for s in args.strategies:
            name = f"{'te' if impl != 'local' else 'local'}-{'fp8' if fp8 else 'bf16'}-{s}"
            built[name] = build(args, s, impl, fp8)
            names.append(name)
    batches = corpus.batches(7, args.num_microbatches, args.micro_batch_size, args.seq_length, "cuda")
    tokens_per_step = args.num_microbatches * args.micro_batch_size * args.seq_length
    for name in names:  # warm-up (kernels, allocator, optimizer state)
        train_step(*built[name], batches)
    torch.cuda.synchronize()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps_per_round):
                train_step(*built[n], batches)
            torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t0) / args.steps_per_round)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    fpt = flops_per_token(args)
    out = {}
    print(
        f"throughput ({args.rounds} interleaved rounds x {args.steps_per_round} steps, "
        f"{tokens_per_step} tokens/step; MFU vs {peak} TFLOP/s dense bf16):",
        flush=True,
    )
    for n in names:
        t = statistics.median(times[n])
        tps = tokens_per_step / t
        mfu = tps * fpt / (peak * 1e12) if peak else float("nan")
        out[n] = {"step_s": t, "tokens_per_s": tps, "mfu": mfu}
        print(f"  {n:28s} step {1000 * t:8.1f} ms  {tps:10.0f} tok/s  MFU {100 * mfu:5.1f}%", flush=True)

    def ratio(a, b):  # median over rounds of per-round step-time ratios (paired)
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratios = {}
    for prefix in sorted({n.rsplit("-", 1)[0] for n in names}):
        a, b = f"{prefix}-unified", f"{prefix}-standard"
        if a in times and b in times:
            ratios[f"{prefix}: unified/standard step time"] = ratio(a, b)
    for s in args.strategies:
        for te in ("te-bf16", "te-fp8"):
            if f"{te}-{s}" in times:
                ratios[f"{s}: {te}/local-bf16 step time"] = ratio(f"{te}-{s}", f"local-bf16-{s}")
    for k, v in ratios.items():
        print(f"  ratio {k:45s} {v:.3f}x", flush=True)
    if not te_ok:
        print("  (Transformer Engine not available: local backend only; paper's claim: unified <= 1.04x)")
    results["throughput"] = {"models": out, "ratios": ratios, "times": times}


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_te_check.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    init()
    corpus = ByteCorpus()
    print(
        f"corpus: {corpus.data.numel() / 1e6:.1f} M byte tokens; model d={args.hidden_size} "
        f"L={args.num_layers} seq={args.seq_length} x {args.num_microbatches} micro-batches",
        flush=True,
    )
    results = {"args": vars(args), "device": torch.cuda.get_device_name()}
    t0 = time.time()
    fp8_agreement(args, corpus, results)
    print(f"[fp8 part {time.time() - t0:.0f} s]", flush=True)
    t0 = time.time()
    throughput(args, corpus, results)
    print(f"[throughput part {time.time() - t0:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
