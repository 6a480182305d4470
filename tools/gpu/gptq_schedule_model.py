#!/usr/bin/env python3
# A model of the schedule of GptqBlockRegistersKernel (kernels/cuda/gptq.cu) for one weight row:
# kLanes lanes, kSharedUWidth / kLanes registers a lane, windows of kLanes columns with the
# registers shifted down after each, the update predicates and the group starts (next_group).
# It replays the kernel's indexing in float32 against the sequential column loop (each weight
# updated as fsub(w, fmul(e, U)) in column order) and checks that every column's code, value, e
# and W̃ are the same bits. What it checks is the schedule, not the GPU: the group fit and the
# rounding here are simplified stand-ins, the same function on both sides; cuda_quant_test's
# GptqSolveOneLazyBlockIsBitIdenticalToCpu checks the kernel itself against the CPU reference.
# Usage: python3 tools/gpu/gptq_schedule_model.py   (needs numpy; prints the cases checked)
import numpy as np

f32 = np.float32
LANES, WIDTH = 8, 128  # kRowLanes, kSharedUWidth
REGS = WIDTH // LANES


def fit(values, maxq=15):
    xmin, xmax = min(min(values), f32(0)), max(max(values), f32(0))
    if xmin == xmax:
        xmin, xmax = f32(-1), f32(1)
    scale = f32((xmax - xmin) / f32(maxq))
    return scale, max(0, min(int(np.rint(-xmin / scale)), maxq))


def rounded(w, params, maxq=15):
    scale, zero = params
    q = np.rint(w / scale) + zero
    q = 0 if not q > 0 else min(int(q), maxq)
    return q, f32(scale * f32(q - zero))


def sequential(w0, u, i1, i2, g, n, p):
    w, out = w0.copy(), []
    for c in range(i2 - i1):
        i = i1 + c
        if i % g == 0:
            length = min(g, n - i)
            p = fit(list(w[c:c + length]) if i + length <= i2 else list(w0[c:c + length]))
        code, wq = rounded(w[c], p)
        e = f32((w[c] - wq) / u[c][c])
        out.append((code, wq, e, w[c]))
        for j in range(c + 1, i2 - i1):
            w[j] = f32(w[j] - f32(e * u[c][j]))
    return out


def registers(w0, u, i1, i2, g, n, p):
    width = i2 - i1
    regs = [[w0[k * LANES + sub] if k * LANES + sub < width else f32(0) for k in range(REGS)]
            for sub in range(LANES)]
    out = [None] * width
    next_group = (i1 + g - 1) // g * g
    for kk in range((width + LANES - 1) // LANES):
        for s in range(LANES):
            c = kk * LANES + s
            if c >= width:
                break
            i = i1 + c
            if i == next_group:
                next_group += g
                length = min(g, n - i)
                if i + length <= i2:
                    values = [regs[sub][k] for sub in range(LANES) for k in range(REGS)
                              if c <= (kk + k) * LANES + sub < c + length]
                else:
                    values = list(w0[c:c + length])
                p = fit(values)
            wi = regs[s][0]  # the shuffle from lane s
            code, wq = rounded(wi, p)
            e = f32((wi - wq) / u[c][c])
            out[c] = (code, wq, e, wi)
            for sub in range(LANES):
                for k in range(REGS):
                    j = (kk + k) * LANES + sub
                    if c < j < width:
                        regs[sub][k] = f32(regs[sub][k] - f32(e * u[c][j]))
        for sub in range(LANES):
            regs[sub] = regs[sub][1:] + [f32(0)]
    return out


def main():
    rng = np.random.default_rng(1)
    cases = 0
    for width in [1, 7, 8, 9, 48, 64, 100, 127, 128]:
        for g in [8, 16, 32, 64, 96, 128, 1000]:
            for i1 in [0, 32, 64]:
                i2 = i1 + width
                n = i2 + int(rng.integers(0, 50))
                # A group reaching past the block starts it (GptqSolve cuts blocks so).
                if any(i % g == 0 and i + min(g, n - i) > i2 and i != i1 for i in range(i1, i2)):
                    continue
                w0 = rng.standard_t(3, size=n).astype(f32)
                u = np.triu(rng.standard_normal((width, width)).astype(f32))
                u += np.eye(width, dtype=f32) * f32(3)
                p = (f32(0.1), 7)  # the parameters of a group continued from an earlier block
                want = sequential(w0, u, i1, i2, g, n, p)
                got = registers(w0, u, i1, i2, g, n, p)
                assert got == want, f'width {width}, g {g}, block start {i1}'
                cases += 1
    print(f'the register schedule equals the sequential loop bit for bit in {cases} cases')


if __name__ == '__main__':
    main()
