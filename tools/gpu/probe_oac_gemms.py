#!/usr/bin/env python3
"""Times the GEMM shapes of the OAC gradient pass's statistics with torch (cuBLAS), as a proxy for
choosing how qcal issues them (issue 12; docs/BENCHMARKS.md cites the numbers).

For one 7B chunk (8 samples x 2048 tokens) it compares, per shape:
  - symmetric products X^T Z (n = 4096 and 11008, K = 16384): the full product, 8 row panels of
    the lower triangle (how GemmLower issues it), and recursive halving with each level batched;
  - the per-sample P = G G^T (L = 2048, K = d_out): 8 samples x 8 row panels, batched full
    products, batched recursive halving;
  - Z = P X per sample against batched, bf16 output;
  - the fp32 -> bf16 conversion of a chunk's activations;
  - attention forward and backward (SDPA, causal, 8 x 32 heads x 2048 x 128) for scale.
Usage: python3 probe_oac_gemms.py  (prints a table; median of repeats, CUDA events).
"""
import torch

from cuda_events import median_ms as bench

torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
bf = torch.bfloat16


def mm32(a, b, out=None):
    # bf16 operands, fp32 result (the engine's GEMM contract).
    try:
        return torch.mm(a, b, out_dtype=torch.float32) if out is None else torch.mm(
            a, b, out_dtype=torch.float32, out=out)
    except TypeError:
        return torch.mm(a, b).float()


rows = []


def report(name, ms, flops):
    rows.append((name, ms, flops / ms / 1e9))


def sym_variants(n, k, tag):
    x = torch.randn(k, n, device=dev, dtype=bf)
    z = torch.randn(k, n, device=dev, dtype=bf)
    h = torch.zeros(n, n, device=dev, dtype=torch.float32)
    full = 2.0 * n * n * k
    report(f"{tag} full XtZ", bench(lambda: mm32(x.t(), z)), full)

    def panels():
        w = ((n + 7) // 8 + 63) // 64 * 64
        for r0 in range(0, n, w):
            r1 = min(n, r0 + w)
            h[r0:r1, :r1] += mm32(x[:, r0:r1].t(), z[:, :r1])

    report(f"{tag} 8 row panels", bench(panels), full)

    def halving(depth):
        # level j: 2^j rectangles of (n / 2^(j+1))^2, batched; leaves: 2^depth full blocks.
        def run():
            for j in range(depth):
                parts = 2 ** j
                blk = n // (2 * parts)
                a = torch.stack([x[:, (2 * i + 1) * blk:(2 * i + 2) * blk] for i in range(parts)])
                b = torch.stack([z[:, 2 * i * blk:(2 * i + 1) * blk] for i in range(parts)])
                torch.bmm(a.transpose(1, 2), b).float()
            parts = 2 ** depth
            blk = n // parts
            a = torch.stack([x[:, i * blk:(i + 1) * blk] for i in range(parts)])
            b = torch.stack([z[:, i * blk:(i + 1) * blk] for i in range(parts)])
            torch.bmm(a.transpose(1, 2), b).float()
        return run

    for d in (1, 2, 3):
        report(f"{tag} halving d={d} (incl. stacking copies)", bench(halving(d)), full)


def p_variants(d_out, tag, samples=8, l=2048):
    g = torch.randn(samples, l, d_out, device=dev, dtype=bf)
    full = 2.0 * samples * l * l * d_out
    p = torch.zeros(samples, l, l, device=dev, dtype=torch.float32)

    def panels():
        w = 256
        for s in range(samples):
            for r0 in range(0, l, w):
                r1 = r0 + w
                p[s, r0:r1, :r1] = mm32(g[s, r0:r1], g[s, :r1].t())

    report(f"{tag} P 8 samples x 8 panels", bench(panels), full)
    report(f"{tag} P batched full", bench(lambda: torch.bmm(g, g.transpose(1, 2))), full)

    def two_panels():
        half = l // 2
        torch.bmm(g[:, :half], g[:, :half].transpose(1, 2))
        torch.bmm(g[:, half:], g.transpose(1, 2))

    report(f"{tag} P batched 2 panels", bench(two_panels), full)


def z_variants(d_in, tag, samples=8, l=2048):
    p = torch.randn(samples, l, l, device=dev, dtype=bf)
    x = torch.randn(samples, l, d_in, device=dev, dtype=bf)
    flops = 2.0 * samples * l * l * d_in

    def per_sample():
        for s in range(samples):
            mm32(p[s], x[s])

    report(f"{tag} Z per sample (fp32 out)", bench(per_sample), flops)
    report(f"{tag} Z batched (bf16 out)", bench(lambda: torch.bmm(p, x)), flops)


for n in (4096, 11008):
    sym_variants(n, 16384, f"n={n}")
for d in (4096, 11008):
    p_variants(d, f"d_out={d}")
for d in (4096, 11008):
    z_variants(d, f"d_in={d}")

a = torch.randn(16384, 11008, device=dev, dtype=torch.float32)
ms = bench(lambda: a.to(bf))
rows.append(("convert 16384x11008 f32->bf16", ms, a.numel() * 6 / ms / 1e9))  # GB/s column
w = torch.randn(11008, 4096, device=dev, dtype=bf)
xa = torch.randn(16384, 4096, device=dev, dtype=bf)
report("linear 16384x4096 -> 11008 bf16", bench(lambda: xa @ w.t()), 2.0 * 16384 * 4096 * 11008)

q = torch.randn(8, 32, 2048, 128, device=dev, dtype=bf, requires_grad=True)
k = torch.randn_like(q, requires_grad=True)
v = torch.randn_like(q, requires_grad=True)
att_flops = 4.0 * 8 * 32 * 2048 * 2048 * 128 / 2
f = torch.nn.functional.scaled_dot_product_attention
report("SDPA causal fwd", bench(lambda: f(q, k, v, is_causal=True)), att_flops)
o = f(q, k, v, is_causal=True)
do = torch.randn_like(o)
report("SDPA causal bwd", bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)),
       2.5 * att_flops)

print(f"{'what':52s} {'ms':>9s} {'TFLOP/s or GB/s':>16s}")
for name, ms, rate in rows:
    print(f"{name:52s} {ms:9.3f} {rate:16.1f}")
