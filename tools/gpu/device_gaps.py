#!/usr/bin/env python3
# Where the device idles. Reads either
#   - `nsys stats --report cuda_gpu_trace --format csv` (kernels and copies of every stream, start
#     and duration in ns), or
#   - the CSV of tools/gpu/cupti_trace (a "Kind" column: kernel, memcpy, memset on the device;
#     runtime, driver, sync on the host),
# merges the device's intervals, and prints the span, the busy time, and the idle gaps summed by
# the pair of operations around them (largest first). With host rows (the CUPTI trace) it also
# says what the host was doing during the gaps: the time inside each CUDA runtime call, and the
# time in no CUDA call at all (the host's own code).
# Usage: device_gaps.py TRACE_CSV [MIN_GAP_US]
import bisect, csv, sys, collections

DEVICE_KINDS = {'kernel', 'memcpy', 'memset'}
min_gap = float(sys.argv[2]) * 1000 if len(sys.argv) > 2 else 2000.0
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.strip()]
start = next((i for i, l in enumerate(lines)
              if l.lstrip('"').startswith('Start') or l.lstrip('"').startswith('Kind')), None)
if start is None:
    sys.exit(sys.argv[1] + ': no "Start (ns)" header: not an nsys cuda_gpu_trace CSV or a '
             'cupti_trace CSV')
rows, host = [], []
for d in csv.DictReader(lines[start:]):
    try:
        s = float(d['Start (ns)']); n = float(d['Duration (ns)'])
    except (KeyError, ValueError, TypeError):
        continue
    kind = d.get('Kind')
    name = (d.get('Name') or '?').split('(')[0][:48]
    if kind is None or kind in DEVICE_KINDS:
        rows.append((s, s + n, name))
    elif kind == 'runtime':
        host.append((s, s + n, name))
rows.sort()
host.sort()
if not rows:
    sys.exit('no device operations in ' + sys.argv[1])

# The host's runtime calls merged into disjoint intervals, each named by its longest call.
merged = []
for s, e, name in host:
    if merged and s <= merged[-1][1]:
        m = merged[-1]
        if e - s > m[3]:
            m[2], m[3] = name, e - s
        m[1] = max(m[1], e)
    else:
        merged.append([s, e, name, e - s])
starts = [m[0] for m in merged]
host_in_gaps = collections.defaultdict(float)


def attribute(g0, g1):
    """Adds the gap's overlap with each merged host call, and the rest as host code."""
    covered = 0.0
    i = max(0, bisect.bisect_right(starts, g0) - 1)
    while i < len(merged) and merged[i][0] < g1:
        o = min(g1, merged[i][1]) - max(g0, merged[i][0])
        if o > 0:
            host_in_gaps[merged[i][2]] += o
            covered += o
        i += 1
    host_in_gaps['(no CUDA call: host code)'] += (g1 - g0) - covered


busy = 0.0
gaps = collections.defaultdict(lambda: [0, 0.0])
cur_s, cur_e, cur_name = rows[0]
for s, e, name in rows[1:]:
    if s > cur_e:
        busy += cur_e - cur_s
        g = s - cur_e
        if g >= min_gap:
            k = gaps[(cur_name, name)]; k[0] += 1; k[1] += g
            if merged:
                attribute(cur_e, s)
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
if merged:
    print("the host during those gaps:")
    for name, t in sorted(host_in_gaps.items(), key=lambda x: -x[1])[:12]:
        print("%9.2f ms  %s" % (t / 1e6, name))
