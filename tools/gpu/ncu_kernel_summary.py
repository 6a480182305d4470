#!/usr/bin/env python3
# Sums ncu --csv per-launch durations (metric gpu__time_duration.sum) by kernel name: the launches
# of one marked range (qcal bench --retrain-profiler-step with ncu --profile-from-start off).
# Usage: ncu_kernel_summary.py NCU_CSV
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
hdr = None
agg = collections.OrderedDict()
for r in rows:
    if 'Kernel Name' in r and 'Metric Value' in r:
        hdr = r; continue
    if hdr is None or len(r) != len(hdr): continue
    d = dict(zip(hdr, r))
    if d.get('Metric Name') != 'gpu__time_duration.sum': continue
    name = d['Kernel Name'].split('(')[0][:70]
    v = float(d['Metric Value'].replace(',', ''))
    unit = d.get('Metric Unit', 'nsecond')
    us = v / 1000 if unit.startswith('n') else (v if unit.startswith('u') else v * 1000)
    a = agg.setdefault(name, [0, 0.0]); a[0] += 1; a[1] += us
tot = sum(a[1] for a in agg.values())
print("total %.1f us over %d launches" % (tot, sum(a[0] for a in agg.values())))
for n, (c, us) in sorted(agg.items(), key=lambda x: -x[1][1])[:40]:
    print("%9.1f us %4d  %s" % (us, c, n))
