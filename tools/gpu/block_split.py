#!/usr/bin/env python3
# Block by block, what a `qcal bench` run spends, from the CSV of tools/gpu/cupti_trace (run with
# its host rows). The bench draws each block's weights (FillUniformKernel) before timing it, so
# the draws split the trace: a block's window runs from the end of one cluster of draws to the
# start of the next (or to the trace's end). For each window: its span, the device's busy time,
# the host's time inside CUDA runtime and driver calls by name, and how many kernels launched for
# the first time in the trace (each one a module the driver loads lazily). Comparing the first
# block with the next shows what the first block's warm-up is made of.
# Usage: block_split.py TRACE_CSV [MARKER_RE] [TOP]
import collections, csv, re, sys

if len(sys.argv) < 2:
    sys.exit('usage: block_split.py TRACE_CSV [MARKER_RE] [TOP]')
marker = re.compile(sys.argv[2] if len(sys.argv) > 2 else 'FillUniformKernel')
top = int(sys.argv[3]) if len(sys.argv) > 3 else 15
DEVICE = {'kernel', 'memcpy', 'memset'}
device, host = [], []
with open(sys.argv[1]) as f:
    for d in csv.DictReader(l for l in f if l.strip()):
        try:
            s, n = float(d['Start (ns)']), float(d['Duration (ns)'])
        except (KeyError, ValueError, TypeError):
            continue
        full = (d.get('Name') or '?').split('(')[0]
        name = full[:60]
        if d.get('Kind') in DEVICE:
            # Mangled names put the kernel's own name after its namespaces, so the marker is
            # matched on the whole name, not the shortened one shown.
            device.append((s, n, name, bool(marker.search(full))))
        elif d.get('Kind') in ('runtime', 'driver'):
            host.append((s, n, d['Kind'] + ' ' + name, False))
device.sort()
host.sort()
if not device:
    sys.exit('no device operations in ' + sys.argv[1])

# Clusters of draws: marker kernels with at most GAP other operations between one and the next (a
# block's draw interleaves its weights' fills with a few memsets and copies; its solve runs
# thousands of operations).
GAP = 64
draws, since = [], GAP + 1
for s, n, name, hit in device:
    if hit and since <= GAP:
        draws[-1][1] = s + n
    elif hit:
        draws.append([s, s + n])
    since = 0 if hit else since + 1
if not draws:
    sys.exit('no operation matches ' + marker.pattern)
end = max(s + n for s, n, _, _ in device)
windows = [(draws[i][1], draws[i + 1][0] if i + 1 < len(draws) else end)
           for i in range(len(draws))]

seen = set()
for i, (a, b) in enumerate(windows):
    busy, first, kernels = 0.0, 0, 0
    cur_s = cur_e = None
    for s, n, name, _ in device:
        if s < a or s >= b:
            if s < a and name not in seen:
                seen.add(name)
            continue
        kernels += 1
        if name not in seen:
            seen.add(name)
            first += 1
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, s + n
        else:
            cur_e = max(cur_e, s + n)
    if cur_e is not None:
        busy += cur_e - cur_s
    calls, counts = collections.Counter(), collections.Counter()
    for s, n, name, _ in host:
        if a <= s < b:
            calls[name] += n
            counts[name] += 1
    print(f'block {i + 1}: span {(b - a) / 1e6:.1f} ms, device busy {busy / 1e6:.1f} ms, idle '
          f'{(b - a - busy) / 1e6:.1f} ms; {kernels} device operations, {first} names seen for '
          'the first time')
    for name, ns in calls.most_common(top):
        print(f'  {ns / 1e6:9.2f} ms {counts[name]:6d}  {name}')
