#!/usr/bin/env python3
"""Times the GPTQ solve's library pieces with PyTorch on the GPU machine (issue 16).

Not qcal's code: an independent measurement of what cuSOLVER and cuBLAS can do at the 7B and 70B
shapes, to choose the next lever for the factorizations (today: cusolverDnXpotrf + Xtrtri, fp32)
and the report's output errors (today: 3xTF32 products of E^T E against the Gram). For each width
n: Cholesky (fp32, fp64), the triangular inverse as a TRSM against I, and the whole inverse
factor. For each layer shape: tr(E G E^T) in fp32 (no TF32), TF32 and bf16, with each one's
relative error against fp64.

  usage: python3 tools/gpu/solver_probe.py [--widths 4096,11008] [--runs 5]
"""
import argparse

import torch

from cuda_events import median_ms


def spd(n, tokens, gen):
    x = torch.randn(tokens, n, device="cuda", generator=gen, dtype=torch.bfloat16)
    h = (x.T.float() @ x.float())
    h += 0.01 * h.diagonal().mean() * torch.eye(n, device="cuda")
    return h


def factorizations(n, runs, gen):
    h = spd(n, 4096, gen)
    h64 = h.double()
    eye = torch.eye(n, device="cuda")
    lower = torch.linalg.cholesky(h)
    rows = {
        "potrf fp32": median_ms(lambda: torch.linalg.cholesky(h), runs, 1),
        "potrf fp64": median_ms(lambda: torch.linalg.cholesky(h64), runs, 1),
        "trsm(L, I) fp32": median_ms(
            lambda: torch.linalg.solve_triangular(lower, eye, upper=False), runs, 1),
        "cholesky_inverse fp32": median_ms(lambda: torch.cholesky_inverse(lower), runs, 1),
        "inv fp32 (getrf)": median_ms(lambda: torch.linalg.inv(h), runs, 1),
    }
    for name, ms in rows.items():
        print(f"factor n={n:6d} {name:24s} {ms:9.3f} ms")


def output_errors(d_out, d_in, runs, gen):
    g = spd(d_in, 2048, gen)
    e = 0.01 * torch.randn(d_out, d_in, device="cuda", generator=gen)
    want = torch.trace(e.double() @ g.double() @ e.double().T).item()

    def fp32():
        torch.backends.cuda.matmul.allow_tf32 = False
        return ((e @ g) * e).sum()

    def tf32():
        torch.backends.cuda.matmul.allow_tf32 = True
        return ((e @ g) * e).sum()

    eb, gb = e.bfloat16(), g.bfloat16()

    def bf16():
        return ((eb @ gb).float() * e).sum()

    for name, fn in (("fp32", fp32), ("tf32", tf32), ("bf16", bf16)):
        got = fn().item()
        ms = median_ms(fn, runs, 1)
        print(f"error {d_out:6d}x{d_in:<6d} {name:5s} {ms:9.3f} ms  rel {abs(got - want) / want:.2e}")
    torch.backends.cuda.matmul.allow_tf32 = False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--widths", default="4096,11008")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for n in (int(w) for w in a.widths.split(",")):
        factorizations(n, a.runs, gen)
    for d_out, d_in in ((4096, 4096), (11008, 4096), (4096, 11008)):
        output_errors(d_out, d_in, a.runs, gen)


if __name__ == "__main__":
    main()
