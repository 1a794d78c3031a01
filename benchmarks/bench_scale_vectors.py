"""Step time and peak memory of each scale-vector strategy relative to `standard`, side by side.

Not a test. The protocol (production-like shapes): hidden 1024, seq 2048 per micro-batch, 4 micro-batches
per step per rank; fp32 and bf16 mixed precision, each with the distributed optimizer; 1 rank and 2 ranks
(DP2, gloo); >= 10 interleaved rounds. Each strategy is built and stepped by the training loop's own code
(``Trainer.build_model`` / ``build_optimizer`` / ``train_step`` with flags parsed and validated by the CLI
parser), so the benchmark measures what ``pretrain_gpt_sv.py`` runs. ``megatron-ref`` is the same loop
with Megatron-Core's own local layers (with an SP-capable norm and SDPA attention) in place of our specs.

Per setting (precision x ranks) all strategies live in one world of processes and are stepped round-robin,
the order rotating every round, so drift affects all alike. Reported: the median over rounds of
time(strategy) / time(standard) with a bootstrap 95% interval (rounds resampled), and peak memory.
Peak memory on GPU: torch.cuda.max_memory_allocated. On CPU (no allocator statistics) it is counted
exactly from tensors: every tensor storage alive after a training step that was not alive before the
strategy was built (parameters, DDP gradient buffers, optimizer state and any cached fold), plus the
storages autograd holds for backward at the end of one micro-batch's forward, where a step peaks. Memory is
measured as each strategy is built (the ones built before sit idle), so each is built once.

    python benchmarks/bench_scale_vectors.py --out docs/results/overhead           # key set, full protocol
    python benchmarks/bench_scale_vectors.py --precisions bf16 --ranks 1 --rounds 10  # one setting
    python benchmarks/bench_scale_vectors.py --strategies all --precisions fp32 --ranks 1
    python benchmarks/bench_scale_vectors.py --quick                               # tiny shapes, checks the tool
    python benchmarks/bench_scale_vectors.py --precisions bf16 --ranks 1 \
        --variant 'unified+fp8=unified --fp8-format e4m3'                        # FP8 vs bf16 tokens/s (GPU)

Time on the 2-core CPU at the protocol shapes: each setting takes about (strategies x (rounds + warmup + 1)
x step time); see the estimate printed after warm-up. Key set, one precision, one rank count, 10 rounds:
about 15-20 minutes. Results: ``--out PREFIX`` writes PREFIX.json and PREFIX.md (a Markdown table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import socket
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sv.training.loop import Trainer  # noqa: E402

KEY_SET = ["standard", "hg", "dnp", "unified", "megatron-ref"]
ALL = ["standard", "none", "hg", "dp", "dnp", "or", "er", "iwd", "unified", "megatron-ref"]
# Megatron-Core's own local layers: `standard` on our specs should be >= 0.98x its speed.
MEGATRON_REFERENCE = "megatron-ref"
# targets of the method's cost, as ratios to `standard` (time, peak memory)
TIME_TARGET = {"dnp": 1.04, "unified": 1.04}
TIME_TARGET_DEFAULT = 1.01
MEM_TARGET = 1.01
BOOTSTRAP_SAMPLES = 2000

PROTOCOL = dict(
    num_layers=2,
    hidden_size=1024,
    num_attention_heads=16,
    num_query_groups=4,
    ffn_hidden_size=2816,
    vocab_size=8192,
    seq_length=2048,
    micro_batch_size=1,
    num_microbatches=4,
    rounds=10,
    warmup=2,
)
QUICK = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=176,
    vocab_size=256,
    seq_length=64,
    micro_batch_size=2,
    num_microbatches=4,
    rounds=3,
    warmup=1,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--strategies",
        nargs="+",
        default=KEY_SET,
        help=f"strategies (standard is always included); 'all' = {' '.join(ALL)}; "
        f"{MEGATRON_REFERENCE} = Megatron-Core's local spec",
    )
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument(
        "--ranks",
        nargs="+",
        type=int,
        default=[1, 2],
        choices=[1, 2],
        help="world sizes: 1 rank, or 2 ranks as DP2 (gloo on CPU)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds: checks the tool, not the protocol")
    for k, v in PROTOCOL.items():
        p.add_argument(
            "--" + k.replace("_", "-"), type=int, default=None, help=f"default {v} ({QUICK[k]} with --quick)"
        )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="CPU threads per setting, split evenly over its ranks"
    )
    p.add_argument(
        "--cli-flags",
        default="",
        help="extra pretrain_gpt_sv.py flags for every strategy (one string), e.g. '--sv-fold-once-per-step'",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'NAME=STRATEGY FLAGS'",
        help="also time STRATEGY with extra pretrain_gpt_sv.py flags, reported as NAME and against "
        "STRATEGY (tokens/s ratio); e.g. --variant 'unified+fp8=unified --fp8-format e4m3'",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", help="write PREFIX.json and PREFIX.md")
    p.add_argument(
        "--json",
        help="write one setting's results keyed by strategy (the format "
        "tools/ablation_report.py --overhead-json reads); needs one precision and one rank count",
    )
    args = p.parse_args(argv)
    base = QUICK if args.quick else PROTOCOL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    strategies = ALL if args.strategies == ["all"] else args.strategies
    unknown = [s for s in strategies if s not in ALL]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {ALL} or 'all'")
    args.strategies = list(dict.fromkeys(["standard"] + strategies))
    args.variants = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        base, _, flags = rest.strip().partition(" ")
        if not name or base not in ALL or name in ALL or name in args.variants:
            p.error(f"--variant '{spec}': give 'NAME=STRATEGY FLAGS' with STRATEGY one of {ALL} and a new NAME")
        args.variants[name] = (base, flags)
    args.strategies += list(args.variants)
    if args.json and (len(args.precisions) != 1 or len(args.ranks) != 1):
        p.error("--json holds one setting: give one --precisions and one --ranks value (or use --out)")
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (a median ratio with an interval needs rounds)")
    return args


# -- one world (precision x ranks), run in spawned processes ----------------------------------------------
def cli_flags(opts, name: str, precision: str, world_size: int):
    """The pretrain_gpt_sv.py flags of one strategy (or variant) in one setting."""
    strategy, extra = opts["variants"].get(name, (name, ""))
    flags = [
        "--num-layers",
        opts["num_layers"],
        "--hidden-size",
        opts["hidden_size"],
        "--num-attention-heads",
        opts["num_attention_heads"],
        "--group-query-attention",
        "--num-query-groups",
        opts["num_query_groups"],
        "--ffn-hidden-size",
        opts["ffn_hidden_size"],
        "--seq-length",
        opts["seq_length"],
        "--max-position-embeddings",
        opts["seq_length"],
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        "--micro-batch-size",
        opts["micro_batch_size"],
        "--global-batch-size",
        opts["micro_batch_size"] * opts["num_microbatches"] * world_size,
        "--lr",
        "1e-4",
        "--train-iters",
        "1000000",
        "--mock-data",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        opts["vocab_size"],
        "--use-distributed-optimizer",
        "--no-scale-vector-stats",
        "--eval-iters",
        "0",
        "--seed",
        "1234",
        "--scale-vector-strategy",
        "standard" if strategy == MEGATRON_REFERENCE else strategy,
    ]
    if precision == "bf16":
        flags.append("--bf16")
    return [str(f) for f in flags] + shlex.split(opts["cli_flags"]) + shlex.split(extra)


def _trainer(opts, name, precision, world_size):
    from megatron_sv.training.arguments import parse_args as cli_parse
    from megatron_sv.training.arguments import validate_args
    from megatron_sv.training.data import build_tokenizer_from_args

    config = validate_args(cli_parse(cli_flags(opts, name, precision, world_size)), world_size)
    tokenizer = build_tokenizer_from_args(config.args)
    config = config.with_vocab(tokenizer.vocab_size)
    reference = opts["variants"].get(name, (name,))[0] == MEGATRON_REFERENCE
    trainer = (ReferenceTrainer if reference else Trainer)(config, tokenizer)
    torch.manual_seed(1234)
    trainer.build_model()
    trainer.build_optimizer()
    return trainer


class ReferenceTrainer(Trainer):
    """The training loop with Megatron-Core's own local layers instead of our specs."""

    def build_gpt(self, shape):
        from megatron_sv.models.gpt.reference_model import build_reference_gpt

        return build_reference_gpt(
            self.config,
            vocab_size=shape.vocab_size,
            max_sequence_length=shape.max_position_embeddings or shape.seq_length,
            rotary_base=shape.rotary_base,
        )


def _batches(opts, device):
    g = torch.Generator().manual_seed(0 + torch.distributed.get_rank())
    mbs, seq = opts["micro_batch_size"], opts["seq_length"]
    out = []
    for _ in range(opts["num_microbatches"]):
        t = torch.randint(0, opts["vocab_size"], (mbs, seq + 1), generator=g)
        out.append(
            {
                k: v.to(device)
                for k, v in dict(
                    tokens=t[:, :-1].contiguous(),
                    labels=t[:, 1:].contiguous(),
                    loss_mask=torch.ones(mbs, seq),
                    position_ids=torch.arange(seq).expand(mbs, seq).contiguous(),
                ).items()
            }
        )
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    torch.distributed.barrier()


def _live_storages():
    """{data_ptr: nbytes} of every tensor storage reachable from Python objects."""
    out = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type != "meta":
                st = o.untyped_storage()
                out[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access
            continue
    return out


def _saved_for_backward_bytes(trainer, batch) -> int:
    """Bytes of distinct non-parameter storages autograd holds after one micro-batch's forward."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = trainer.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    out.float().mean().backward()
    return sum(n for ptr, n in storages.items() if ptr not in params)


def build_and_measure(opts, name, precision, world_size, batches, measure: bool):
    """Build one strategy's trainer and step it once; with ``measure`` also its peak memory: on GPU the
    allocator's peak during a second step above what was allocated before it was built, on CPU exact
    tensor accounting (storages that appeared with it, plus one micro-batch's saved-for-backward)."""
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()  # batches and the strategies built before (idle)
    elif measure:
        before = _live_storages()
    trainer = _trainer(opts, name, precision, world_size)
    trainer.train_step(batches)  # optimizer state exists from here on
    if not measure:
        return trainer, None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(batches)
        torch.cuda.synchronize()
        return trainer, dict(peak=float(torch.cuda.max_memory_allocated() - baseline))
    gc.collect()
    static = sum(n for ptr, n in _live_storages().items() if ptr not in before)
    saved = _saved_for_backward_bytes(trainer, batches[0])
    return trainer, dict(peak=float(static + saved), static=float(static), saved_for_backward=float(saved))


def _world_main(rank, world_size, port, opts, precision, result_path):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, opts["threads"] // world_size))
    from megatron_sv.platform import current_device, destroy_distributed, initialize_distributed
    from megatron_sv.scale_vectors.stats import parameter_report

    initialize_distributed(seed=1234)
    try:
        strategies = opts["strategies"]
        device = current_device()
        batches = _batches(opts, device)
        trainers, memory = {}, {}
        for s in strategies:
            trainers[s], mem = build_and_measure(opts, s, precision, world_size, batches, not opts["skip_memory"])
            if mem is not None:
                memory[s] = mem
        sv_params = {s: parameter_report([t.model.module]).scale_vector_params for s, t in trainers.items()}
        for _ in range(opts["warmup"]):  # the last warm-up round estimates a round's time
            t_warm = time.perf_counter()
            for s in strategies:
                trainers[s].train_step(batches)
        per_round = time.perf_counter() - t_warm
        if rank == 0:
            print(f"  warm-up done; about {per_round * opts['rounds'] / 60:.1f} min of timed rounds follow", flush=True)
        times = {s: [] for s in strategies}
        for r in range(opts["rounds"]):
            order = strategies[r % len(strategies) :] + strategies[: r % len(strategies)]
            for s in order:
                _sync()
                t0 = time.perf_counter()
                trainers[s].train_step(batches)
                _sync()
                times[s].append(time.perf_counter() - t0)
            if rank == 0:
                print(
                    f"  round {r + 1}/{opts['rounds']}: "
                    + ", ".join(f"{s} {times[s][-1] * 1e3:.0f} ms" for s in strategies),
                    flush=True,
                )
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(dict(times=times, memory=memory, sv_params=sv_params), f)
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(opts, precision: str, world_size: int) -> dict:
    """All strategies of one setting in a fresh world of ``world_size`` processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(_world_main, args=(world_size, _free_port(), opts, precision, path), nprocs=world_size, join=True)
        with open(path) as f:
            return json.load(f)


# -- statistics and report ---------------------------------------------------------------------------------
def median_ratio_ci(times, base, samples=BOOTSTRAP_SAMPLES, seed=0):
    """Median over rounds of times/base, and a bootstrap 95% interval (rounds resampled)."""
    ratios = [t / b for t, b in zip(times, base)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(samples))
    return statistics.median(ratios), meds[int(0.025 * samples)], meds[int(0.975 * samples) - 1]


def summarize(raw: dict, precision: str, world_size: int, opts: dict) -> list:
    rows = []
    base_t, mem = raw["times"]["standard"], raw["memory"]
    tokens = opts["micro_batch_size"] * opts["seq_length"] * opts["num_microbatches"] * world_size
    for s, ts in raw["times"].items():
        med, lo, hi = median_ratio_ci(ts, base_t)
        mem_ratio = mem[s]["peak"] / mem["standard"]["peak"] if mem else None
        if s == MEGATRON_REFERENCE:  # standard must run at >= 0.98x the reference's speed
            target = f"standard >= 0.98x its speed: {'yes' if med >= 0.98 else 'no'}"
        elif s == "standard":
            target = ""
        elif s in opts["variants"]:
            vbase = opts["variants"][s][0]
            vmed, vlo, vhi = median_ratio_ci(raw["times"][vbase], ts)
            target = f"tokens/s vs {vbase}: {vmed:.3f}x ({vlo:.3f}-{vhi:.3f})"
        else:
            tt = TIME_TARGET.get(s, TIME_TARGET_DEFAULT)
            ok = med <= tt and (mem_ratio is None or mem_ratio <= MEM_TARGET)
            target = f"<= {tt:.2f}x time, <= {MEM_TARGET:.2f}x mem: {'yes' if ok else 'no'}"
        rows.append(
            dict(
                precision=precision,
                ranks=world_size,
                strategy=s,
                ms_per_step=statistics.median(ts) * 1e3,
                tokens_per_s=tokens / statistics.median(ts),
                time_ratio=med,
                time_ratio_ci95=[lo, hi],
                peak_bytes=mem[s]["peak"] if mem else None,
                memory_detail=mem.get(s),
                mem_ratio=mem_ratio,
                sv_params=raw["sv_params"][s],
                target=target,
                rounds=len(ts),
            )
        )
    return rows


def markdown(rows, header: str) -> str:
    lines = [
        header,
        "",
        "| precision | ranks | strategy | ms/step | tokens/s | time vs standard (95% CI) | peak MiB "
        "| memory vs standard | sv params | target met |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        mib = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "-"
        mr = f"{r['mem_ratio']:.3f}x" if r["mem_ratio"] is not None else "-"
        lo, hi = r["time_ratio_ci95"]
        lines.append(
            f"| {r['precision']} | {r['ranks']} | {r['strategy']} | {r['ms_per_step']:.0f} | "
            f"{r['tokens_per_s']:.0f} | "
            f"{r['time_ratio']:.3f}x ({lo:.3f}-{hi:.3f}) | {mib} | {mr} | {r['sv_params']:,} | "
            f"{r['target']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    opts = {
        k: getattr(args, k) for k in list(PROTOCOL) + ["threads", "cli_flags", "skip_memory", "strategies", "variants"]
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    header = (
        f"{'QUICK MODE (tiny shapes; not the protocol). ' if args.quick else ''}"
        f"Device: {device}; hidden {args.hidden_size}, {args.num_layers} layers, ffn {args.ffn_hidden_size}, "
        f"{args.num_microbatches} micro-batches x {args.micro_batch_size * args.seq_length} tokens per rank, "
        f"distributed optimizer, {args.rounds} interleaved rounds (median ratio, bootstrap 95% CI), "
        f"{args.threads} threads per setting; torch {torch.__version__}; "
        f"extra flags: '{args.cli_flags}'."
    )
    rows = []
    for precision in args.precisions:
        for world_size in args.ranks:
            print(f"== {precision}, {world_size} rank(s): {' '.join(args.strategies)}", flush=True)
            t0 = time.time()
            rows += summarize(run_setting(opts, precision, world_size), precision, world_size, opts)
            print(f"   ({(time.time() - t0) / 60:.1f} min)", flush=True)
    table = markdown(rows, header)
    print("\n" + table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(dict(header=header, args=vars(args), rows=rows), f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(table)
        print(f"wrote {args.out}.json and {args.out}.md")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, args=vars(args), results={r["strategy"]: r for r in rows}), f, indent=1)


if __name__ == "__main__":
    main()
