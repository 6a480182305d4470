#!/usr/bin/env python3
# Where the device idles: reads `nsys stats --report cuda_gpu_trace --format csv` (kernels and
# copies of every stream, start and duration in ns), merges the intervals, and prints the span,
# the busy time, and the idle gaps summed by the pair of operations around them (largest first).
# Usage: nsys_gaps.py GPU_TRACE_CSV [MIN_GAP_US]
import csv, sys, collections
min_gap = float(sys.argv[2]) * 1000 if len(sys.argv) > 2 else 2000.0
rows = []
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.strip()]
start = next((i for i, l in enumerate(lines) if l.startswith('"Start') or l.startswith('Start')),
             None)
if start is None:
    sys.exit(sys.argv[1] + ': no "Start (ns)" header: not an nsys cuda_gpu_trace CSV')
for d in csv.DictReader(lines[start:]):
    try:
        s = float(d['Start (ns)']); n = float(d['Duration (ns)'])
    except (KeyError, ValueError):
        continue
    rows.append((s, s + n, d.get('Name', '?').split('(')[0][:48]))
rows.sort()
if not rows:
    sys.exit('no operations in ' + sys.argv[1])
busy = 0.0
gaps = collections.defaultdict(lambda: [0, 0.0])
cur_s, cur_e, cur_name = rows[0]
for s, e, name in rows[1:]:
    if s > cur_e:
        busy += cur_e - cur_s
        g = s - cur_e
        if g >= min_gap:
            k = gaps[(cur_name, name)]; k[0] += 1; k[1] += g
        cur_s, cur_e = s, e
    elif e > cur_e:
        cur_e = e
    cur_name = name if e >= cur_e else cur_name
busy += cur_e - cur_s
span = rows[-1][1] - rows[0][0]
idle = sum(v[1] for v in gaps.values())
print("span %.1f ms, busy %.1f ms, idle %.1f ms (gaps >= %.0f us: %.1f ms in %d)" %
      (span / 1e6, busy / 1e6, (span - busy) / 1e6, min_gap / 1e3, idle / 1e6,
       sum(v[0] for v in gaps.values())))
for (a, b), (c, g) in sorted(gaps.items(), key=lambda x: -x[1][1])[:25]:
    print("%9.2f ms %5d  %s -> %s" % (g / 1e6, c, a, b))
