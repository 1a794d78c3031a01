"""Forward+backward time of DNP's gate/up inner norm + SwiGLU: fused (compiled / eager) vs unfused.

Not a test. Variants are timed in interleaved rounds (round-robin, so drift affects all alike); the figure
per variant is the median over rounds. ``swiglu`` alone is what `standard` pays for its activation.

    python benchmarks/bench_inner_norms.py                         # T=2048, ffn=2816, bf16 and fp32
    python benchmarks/bench_inner_norms.py --tokens 512 --rounds 5 --dtypes bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sv.scale_vectors import inner_norms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def swiglu(x):
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def unfused(x, ug, uu):
    f = x.shape[-1] // 2
    z = inner_norms.scaled_inner_norm(x.view(*x.shape[:-1], 2, f), torch.stack([ug, uu]), "RMSNorm", 1e-5)
    return swiglu(z.view(x.shape))


def fused(x, ug, uu):
    return inner_norms.norm_swiglu(x, ug, uu, "RMSNorm", 1e-5)


# name -> (function, kernel mode)
VARIANTS = {
    "swiglu (standard)": (lambda x, ug, uu: swiglu(x), "eager"),
    "swiglu compiled": (lambda x, ug, uu, _c=torch.compile(swiglu): _c(x), "eager"),
    "unfused eager": (unfused, "eager"),
    "unfused, norm compiled": (unfused, "compiled"),
    "fused eager": (fused, "eager"),
    "fused compiled": (fused, "compiled"),
}


def run_once(fn, mode, x, ug, uu, gy):
    os.environ[inner_norms.KERNELS_ENV] = mode
    t0 = time.perf_counter()
    y = fn(x, ug, uu)
    y.backward(gy)
    dt = time.perf_counter() - t0
    x.grad = ug.grad = uu.grad = None
    return dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=2816)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    saved_mode = os.environ.get(inner_norms.KERNELS_ENV)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.tokens, 2 * args.ffn_hidden_size, generator=g).to(dtype).requires_grad_()
        ug = (0.5 + torch.rand(args.ffn_hidden_size, generator=g)).to(dtype).requires_grad_()
        uu = (0.5 + torch.rand(args.ffn_hidden_size, generator=g)).to(dtype).requires_grad_()
        gy = torch.randn(args.tokens, args.ffn_hidden_size, generator=g).to(dtype)
        times = {k: [] for k in VARIANTS}
        for name, (fn, mode) in VARIANTS.items():  # warm-up (compiles)
            for _ in range(2):
                run_once(fn, mode, x, ug, uu, gy)
        for _ in range(args.rounds):
            for name, (fn, mode) in VARIANTS.items():
                times[name].append(run_once(fn, mode, x, ug, uu, gy))
        print(
            f"{dname}: T={args.tokens}, ffn={args.ffn_hidden_size}, {args.threads} threads, "
            f"median of {args.rounds} interleaved rounds, forward+backward"
        )
        for name, ts in times.items():
            print(f"  {name:<24} {statistics.median(ts) * 1e3:8.1f} ms")
    if saved_mode is None:
        os.environ.pop(inner_norms.KERNELS_ENV, None)
    else:
        os.environ[inner_norms.KERNELS_ENV] = saved_mode


if __name__ == "__main__":
    main()
