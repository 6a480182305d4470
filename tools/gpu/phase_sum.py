#!/usr/bin/env python3
# Device time of one phase of a job, kernel by kernel, from the CSV of tools/gpu/cupti_trace. A
# phase is found by a marker: the device operations whose short name matches MARKER_RE form
# clusters (consecutive markers at most GAP_MS apart); a cluster's window runs from its first
# marker's start to its last marker's end. Prints each window's span and busy time, then the
# kernels inside all windows summed by name, and the same for the time outside them.
# Example: ASER's smoothing statistics pass is the only user of the channel-statistics kernels
# (SegmentKernel, CombineKernel) in an ASER bench with SVD whitening, so
#   phase_sum.py trace.csv 'SegmentKernel|CombineKernel' 50
# splits the trace into the smoothing passes and everything else.
# Usage: phase_sum.py TRACE_CSV MARKER_RE [GAP_MS] [TOP]
import collections, os, re, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_sum import device_ops  # noqa: E402

if len(sys.argv) < 3:
    sys.exit('usage: phase_sum.py TRACE_CSV MARKER_RE [GAP_MS] [TOP]')
marker = re.compile(sys.argv[2])
gap = float(sys.argv[3]) * 1e6 if len(sys.argv) > 3 else 50e6
top = int(sys.argv[4]) if len(sys.argv) > 4 else 20
ops = device_ops(sys.argv[1])
ops.sort()
windows = []
for s, n, name in ops:
    if not marker.search(name):
        continue
    if windows and s - windows[-1][1] <= gap:
        windows[-1][1] = max(windows[-1][1], s + n)
    else:
        windows.append([s, s + n])
if not windows:
    sys.exit('no operation matches ' + sys.argv[2])
inside, outside = collections.Counter(), collections.Counter()
count_in, count_out = collections.Counter(), collections.Counter()
busy = [0.0] * len(windows)
w = 0
for s, n, name in ops:
    while w < len(windows) and s >= windows[w][1]:
        w += 1
    if w < len(windows) and s >= windows[w][0]:
        inside[name] += n
        count_in[name] += 1
        busy[w] += n
    else:
        outside[name] += n
        count_out[name] += 1
for i, (a, b) in enumerate(windows):
    print(f'window {i}: span {(b - a) / 1e6:9.2f} ms, busy {busy[i] / 1e6:9.2f} ms')
for title, total, count in (('inside', inside, count_in), ('outside', outside, count_out)):
    t = sum(total.values())
    print(f'{title} the windows: device busy {t / 1e6:.1f} ms in {sum(count.values())} operations')
    for name, ns in total.most_common(top):
        print(f'{ns / 1e6:9.2f} ms {100 * ns / max(t, 1):5.1f}% {count[name]:7d}  {name}')
