#!/usr/bin/env python3
# Device time by kernel name, from the CSV of tools/gpu/cupti_trace (rows of Kind kernel, memcpy
# and memset): the total, the count and the share of the device's busy time of each name, largest
# first. Where the time of a stage (`qcal bench`'s split) goes, kernel by kernel.
# Usage: kernel_sum.py TRACE_CSV [TOP]
import collections, csv, re, sys


def short_name(raw):
    # A mangled qcal name (_ZN4qcal...) keeps its last component, the kernel's own name:
    # qcal's kernels share a long namespace prefix, which a fixed cut would merge into one row.
    name = raw.split('(')[0]
    if name.startswith('_ZN4qcal'):
        i, parts = 3, []
        while i < len(name):
            m = re.match(r'\d+', name[i:])
            if not m:
                break
            n = int(m.group())
            i += len(m.group())
            parts.append(name[i:i + n])
            i += n
        if parts:
            return parts[-1] + (' <' + name[i:i + 24] + '>' if i < len(name) else '')
    return name[:70]


def device_ops(path):
    """The device operations of a cupti_trace CSV: (start ns, duration ns, 'kind short name')."""
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    start = next((i for i, l in enumerate(lines) if l.lstrip('"').startswith('Kind')), None)
    if start is None:
        sys.exit(path + ': no "Kind" header: not a cupti_trace CSV')
    ops = []
    for d in csv.DictReader(lines[start:]):
        if d.get('Kind') not in ('kernel', 'memcpy', 'memset'):
            continue
        try:
            s, n = float(d['Start (ns)']), float(d['Duration (ns)'])
        except (KeyError, ValueError, TypeError):
            continue
        ops.append((s, n, d['Kind'] + ' ' + short_name(d.get('Name') or '?')))
    return ops


def main():
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    total = collections.Counter()
    count = collections.Counter()
    for _, n, name in device_ops(sys.argv[1]):
        total[name] += n
        count[name] += 1
    busy = sum(total.values())
    print(f'device busy {busy / 1e6:.1f} ms in {sum(count.values())} operations')
    for name, ns in total.most_common(top):
        print(f'{ns / 1e6:9.2f} ms {100 * ns / busy:5.1f}% {count[name]:7d}  {name}')


if __name__ == '__main__':
    main()
