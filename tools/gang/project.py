#!/usr/bin/env python3
"""Projected wall time of one GPTQ job shared by a gang of W GPU workers (a model, not a measurement).

Projects the Llama-2-7B and Llama-2-70B shapes, 128 samples x 2048 tokens (C = 16 chunks of 8),
GPTQ W4 g128 as measured by `qcal bench` on one GPU, for W = 1, 2, 4, 8 workers over three
networks: NVLink (300 GB/s per direction), 400 Gb/s and 100 Gb/s (per worker, per direction).
Standard library only. Usage:

    python3 tools/gang/project.py [--check-docs docs/BENCHMARKS.md] [--workers 1,2,4,8]
        [--samples 128] [--aser-rank 0] [--sha256-gbps 0]

The model (DESIGN sections 2 and 7; services/engine/gang/plan.h):

  Per block, with true_sequential, the four sub-layer groups g (q/k/v, o, gate/up, down) run one
  after another, and each group is: forward + statistics on every rank's own chunks, the exchange
  of partial statistics, the owners' solves, the broadcast of the solved layers (every rank needs
  them before the next group's forward). So

    T_block(W) = (F + H) * m / C                                          data-parallel part
               + sum_g max_r S_g,r                                        solves (critical path)
               + sum_g [X_partials,g + X_statistic,g + X_layers,g]        exchange, NOT overlapped

  F, H: the single-GPU forward and Hessian (statistics) seconds per block; m = the largest chunk
  count of any rank (ranges of plan.h SplitChunks: rank r holds [r*C/W, (r+1)*C/W)); the
  quantized-path push is part of F.

  S_g,r: the solve seconds of rank r in group g, zero if it owns no linear of g, else
     Sfac * k_g^3 / sum_g' k_g'^3                     (every owner in g factorizes the group's
                                                        Hessian of width k_g itself, in parallel)
   + Sloop * sum_{linears l of g owned by r} d_out*d_in^2 / sum_all d_out*d_in^2
   + Sxfer * sum_{linears l of g owned by r} d_out*d_in   / sum_all d_out*d_in
  with Sfac (factorizations), Sloop (column loops, lazy updates and output errors) and Sxfer
  (codes to the host) the single-GPU solve stages per block; owners by plan.h AssignOwners
  (bin-packing by d_out*d_in^2, decreasing cost, ties to the lower linear and rank). At W = 1 this
  is exactly the measured solve time. The brief's simpler bound, the largest owner's share of
  sum d_out*d_in^2 times the whole solve time, is printed alongside ("owner share").

  Exchange bytes per group g, statistic width k_g (q/k/v: hidden, o: q_dim, gate/up: hidden,
  down: intermediate), P = 4 * k_g^2 bytes (one fp32 k x k partial):
    partials   every rank r != the statistic's owner holding chunks sends n_r * P to the owner,
               n_r = the maximal aligned subtrees of the canonical reduction inside its range
               (<= 2*ceil(log2 C)+1; 1 for C = 16 and W dividing 16);
    statistic  the owner (lowest owner among the group's consumers) sends P to every other
               owner of a consumer;
    layers     each owner sends each solved linear to all W-1 other ranks, as its artifact:
               A = d_out*d_in (codes, 1 byte per weight) + (d_out*d_in/128) * (4 + 4) (fp32
               scale and int32 zero per group of 128) + r*(d_out+d_in)*4 (ASER rank-r factors,
               --aser-rank; 0 for plain GPTQ).
  Each of the three phases takes max over ranks of max(bytes sent, bytes received) / B (a
  worker's link is full-duplex, B per direction; incast at an owner and the unicast fan-out of a
  broadcast both count). With --sha256-gbps G, each phase also charges the peer service's sha256
  of every payload (PeerHeader.sha256 precedes the data, so a sender hashes before sending):
  the distinct payload bytes a rank sends / G (a broadcast payload hashed once), plus the
  largest payload from any one sender / G for verifying on arrival (one thread per sender, after
  the last byte). Message latency is left out (a dozen messages per group).

  --split-rows is a what-if outside the contract: every linear's rows split evenly over all W
  ranks (GPTQ's column loop is independent per row given the Hessian), so every rank factorizes
  every group's Hessian, receives every completed statistic, and broadcasts 1/W of each layer.

  Whole model = layers * T_block (the bench's embedding and lm_head work is inside its
  per-block numbers: the 7B whole-model time divided by 32, the 70B bench's per-block time).

Not modeled: reading each block's weights (every rank reads the whole model from the shared
filesystem), boundary checkpoints, NCCL versus gRPC framing, and any overlap of the exchange with
compute (none is assumed: conservative).
"""

import argparse
import math
import re
import sys

# ---------------------------------------------------------------------------------------------
# Single-GPU inputs: docs/BENCHMARKS.md, section "qcal bench, GPTQ W4 g128, Llama-2-7B and -70B
# shapes, 128 x 2048 tokens, bf16, one H100", the rows "2026-11-22 | 1e8b237 (committed)" of the
# 7B table and of the 70B table (NVIDIA H100 80GB HBM3).

# 7B row: Whole model 27.75 s | Forward 9.67 s | Hessians 3.77 s |
#         Solves 14.26 s (3.93 / 5.81 / 2.17 / 2.36), all 32 blocks.
BENCH_7B = {
    "row": "2026-11-22 | 1e8b237 (committed) | NVIDIA H100 80GB HBM3 | 27.75 s",
    "whole": 27.75, "forward": 9.67, "hessians": 3.77,
    "factor": 3.93, "loops": 5.81, "errors": 2.17, "transfers": 2.36,
    "blocks_run": 32, "per_block": 27.75 / 32,
}
# 70B row: Per block (blocks 2-3) 4.020 s | Forward 2.86 s | Hessians 1.80 s |
#          Solves 8.34 s (2.83 / 2.31 / 1.50 / 1.70), stage times over the 3 blocks run.
BENCH_70B = {
    "row": "2026-11-22 | 1e8b237 (committed) | NVIDIA H100 80GB HBM3 | 4.020 s",
    "whole": 321.6, "forward": 2.86, "hessians": 1.80,
    "factor": 2.83, "loops": 2.31, "errors": 1.50, "transfers": 1.70,
    "blocks_run": 3, "per_block": 4.020,
}

SHAPES = {
    "7b": {"name": "Llama-2-7B", "hidden": 4096, "intermediate": 11008, "layers": 32,
           "heads": 32, "kv_heads": 32, "bench": BENCH_7B},
    "70b": {"name": "Llama-2-70B", "hidden": 8192, "intermediate": 28672, "layers": 80,
            "heads": 64, "kv_heads": 8, "bench": BENCH_70B},
}

NETWORKS = [  # bytes per second, per worker, per direction
    ("NVLink 300 GB/s", 300e9),
    ("400 Gb/s", 400e9 / 8),
    ("100 Gb/s", 100e9 / 8),
]

CALIB_CHUNK = 8      # common/text_data.h kCalibChunk
GROUP_SIZE = 128     # the recipe's quantization group
LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]  # LinearKind order
# LinearInput: the sub-layer groups, their consumers (ConsumersOf).
GROUPS = [("q/k/v", [0, 1, 2]), ("o", [3]), ("gate/up", [4, 5]), ("down", [6])]


def linear_shapes(shape):
    """(d_out, d_in) per linear, as plan.cc LinearShape."""
    h, i = shape["hidden"], shape["intermediate"]
    head_dim = h // shape["heads"]
    q_dim, kv_dim = h, shape["kv_heads"] * head_dim
    return [(q_dim, h), (kv_dim, h), (kv_dim, h), (h, q_dim), (i, h), (i, h), (h, i)]


def assign_owners(shapes, world):
    """plan.cc AssignOwners: bin-packing by d_out*d_in^2."""
    cost = [float(o) * i * i for o, i in shapes]
    order = sorted(range(len(shapes)), key=lambda l: (-cost[l], l))
    load = [0.0] * world
    owners = [0] * len(shapes)
    for l in order:
        r = min(range(world), key=lambda x: (load[x], x))
        owners[l] = r
        load[r] += cost[l]
    return owners


def split_chunks(total, world):
    """plan.cc SplitChunks."""
    return [(r * total // world, (r + 1) * total // world) for r in range(world)]


def aligned_subtrees(begin, end, total):
    """Maximal aligned subtrees of the canonical reduction inside [begin, end) (DESIGN section 2):
    the perfect binary tree over total rounded up to a power of two; the last range may take a
    subtree that runs past the last chunk (its missing right parts are no chunks)."""
    size = 1 << max(0, math.ceil(math.log2(total))) if total > 1 else 1
    if end == total:
        end = size
    n, x = 0, begin
    while x < end:
        step = 1
        while x % (step * 2) == 0 and x + step * 2 <= end and step * 2 <= size:
            step *= 2
        n += 1
        x += step
    return n


def artifact_bytes(d_out, d_in, aser_rank):
    weights = d_out * d_in
    return weights + (weights // GROUP_SIZE) * (4 + 4) + aser_rank * (d_out + d_in) * 4


def project(shape, world, samples, bandwidth, aser_rank=0, sha256_bps=0.0, split_rows=False):
    b = shape["bench"]
    scale = b["per_block"] / sum(b[k] for k in ("forward", "hessians", "factor", "loops",
                                                   "errors", "transfers"))
    per = {k: b[k] * scale for k in ("forward", "hessians", "factor", "loops", "errors",
                                      "transfers")}
    shapes = linear_shapes(shape)
    owners = assign_owners(shapes, world)
    total_chunks = (samples + CALIB_CHUNK - 1) // CALIB_CHUNK
    ranges = split_chunks(total_chunks, world)
    max_chunks = max(e - s for s, e in ranges)

    widths = [shapes[c[0]][1] for _, c in GROUPS]  # d_in of each group's input
    sum_k3 = sum(float(k) ** 3 for k in widths)
    sum_c2 = sum(float(o) * i * i for o, i in shapes)
    sum_c1 = sum(float(o) * i for o, i in shapes)

    data_parallel = (per["forward"] + per["hessians"]) * max_chunks / total_chunks

    solves = 0.0
    exchange = 0.0
    max_out = [0] * world  # bytes per block
    max_in = [0] * world
    for (gname, consumers), k in zip(GROUPS, widths):
        # Solves: critical path of the group.
        per_rank = [0.0] * world
        for r in range(world):
            mine = [l for l in consumers if owners[l] == r or split_rows]
            if not mine:
                continue
            t = per["factor"] * k ** 3 / sum_k3
            share = 1.0 / world if split_rows else 1.0
            for l in mine:
                o, i = shapes[l]
                t += (per["loops"] + per["errors"]) * o * i * i / sum_c2 * share
                t += per["transfers"] * o * i / sum_c1 * share
            per_rank[r] = t
        solves += max(per_rank)
        if world == 1:
            continue
        # Exchange: three phases, each bounded by its busiest rank.
        stat_bytes = 4 * k * k
        stat_owner = min(owners[l] for l in consumers)
        consumer_owners = (list(range(world)) if split_rows
                           else sorted({owners[l] for l in consumers}))
        # Each phase: pair bytes [sender][receiver], and the distinct payload bytes a sender
        # hashes (a broadcast payload is hashed once).
        phases = []
        pair = [[0] * world for _ in range(world)]
        distinct = [0] * world
        for r, (s, e) in enumerate(ranges):
            if r != stat_owner and e > s:
                nbytes = aligned_subtrees(s, e, total_chunks) * stat_bytes
                pair[r][stat_owner] += nbytes
                distinct[r] += nbytes
        phases.append((pair, distinct))
        pair = [[0] * world for _ in range(world)]
        distinct = [0] * world
        for r in consumer_owners:
            if r != stat_owner:
                pair[stat_owner][r] += stat_bytes
                distinct[stat_owner] = stat_bytes
        phases.append((pair, distinct))
        pair = [[0] * world for _ in range(world)]
        distinct = [0] * world
        for l in consumers:
            a = artifact_bytes(*shapes[l], aser_rank)
            senders = [(x, a / world) for x in range(world)] if split_rows else [(owners[l], a)]
            for x, nbytes in senders:
                distinct[x] += nbytes
                for r in range(world):
                    if r != x:
                        pair[x][r] += nbytes
        phases.append((pair, distinct))
        for pair, distinct in phases:
            t = 0.0
            for r in range(world):
                sent = sum(pair[r])
                recv = sum(pair[x][r] for x in range(world))
                tr = max(sent, recv) / bandwidth
                if sha256_bps > 0:
                    # Hashed before sending; verified on arrival, one thread per sender.
                    tr += distinct[r] / sha256_bps
                    tr += max(pair[x][r] for x in range(world)) / sha256_bps
                t = max(t, tr)
                max_out[r] += sent
                max_in[r] += recv
            exchange += t

    # The brief's simpler solve bound: largest owner's share of d_out*d_in^2.
    load = [0.0] * world
    for l, (o, i) in enumerate(shapes):
        load[owners[l]] += float(o) * i * i
    owner_share = max(load) / sum_c2
    solves_total = sum(per[k] for k in ("factor", "loops", "errors", "transfers"))

    layers = shape["layers"]
    return {
        "owners": owners,
        "max_chunks": max_chunks,
        "total_chunks": total_chunks,
        "data_parallel": data_parallel * layers,
        "solves": solves * layers,
        "solves_owner_share": solves_total * owner_share * layers,
        "exchange": exchange * layers,
        "whole": (data_parallel + solves + exchange) * layers,
        "out_per_block": max(max_out),
        "in_per_block": max(max_in),
    }


def check_docs(path):
    """The cited rows are in docs/BENCHMARKS.md with the numbers above."""
    text = open(path, encoding="utf-8").read()
    ok = True
    for label, b in (("7B", BENCH_7B), ("70B", BENCH_70B)):
        line = next((l for l in text.splitlines() if l.startswith("| " + b["row"])), None)
        if line is None:
            print(f"{path}: the {label} row '{b['row']}' is missing", file=sys.stderr)
            ok = False
            continue
        want = [b["forward"], b["hessians"], b["factor"], b["loops"], b["errors"], b["transfers"]]
        got = [float(x) for x in re.findall(r"(\d+\.\d+)", line)]
        for w in want:
            if w not in got:
                print(f"{path}: the {label} row does not hold {w}", file=sys.stderr)
                ok = False
    return ok


def fmt_owners(owners, world):
    per = [[LINEARS[l] for l in range(len(owners)) if owners[l] == r] for r in range(world)]
    return "; ".join(f"{r}: " + (",".join(p) if p else "–") for r, p in enumerate(per))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--aser-rank", type=int, default=0)
    ap.add_argument("--sha256-gbps", type=float, default=0.0,
                    help="peer-service sha256 rate per side, GB/s (0: not counted)")
    ap.add_argument("--check-docs", metavar="BENCHMARKS_MD")
    ap.add_argument("--split-rows", action="store_true",
                    help="what-if, not the plan: every linear's rows split over all W ranks")
    args = ap.parse_args()
    if args.check_docs and not check_docs(args.check_docs):
        return 1
    workers = [int(w) for w in args.workers.split(",")]
    sha = args.sha256_gbps * 1e9

    head = ["Model", "W", "Chunks (max per rank)", "Owners (rank: linears)",
            "Data-parallel", "Solves (owner share)", "Exchange out / in per block, busiest rank"]
    head += [f"{n}: exchange / whole / speedup" for n, _ in NETWORKS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in ("7b", "70b"):
        shape = SHAPES[key]
        base = project(shape, 1, args.samples, NETWORKS[0][1])["whole"]
        for w in workers:
            cells = []
            first = None
            for _, bw in NETWORKS:
                p = project(shape, w, args.samples, bw, args.aser_rank, sha, args.split_rows)
                first = first or p
                cells.append(f"{p['exchange']:.1f} s / {p['whole']:.1f} s / "
                             f"{base / p['whole']:.2f}×")
            p = first
            row = [shape["name"] if w == workers[0] else "", str(w),
                   f"{p['max_chunks']} of {p['total_chunks']}",
                   "rows of each split over all" if args.split_rows else fmt_owners(p["owners"], w),
                   f"{p['data_parallel']:.1f} s", f"{p['solves']:.1f} s "
                   f"({p['solves_owner_share']:.1f} s)",
                   f"{p['out_per_block'] / 1e9:.2f} / {p['in_per_block'] / 1e9:.2f} GB"
                   if w > 1 else "–"]
            print("| " + " | ".join(row + cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
