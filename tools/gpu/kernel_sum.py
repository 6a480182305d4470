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


def main():
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    with open(sys.argv[1]) as f:
        lines = [l for l in f if l.strip()]
    start = next((i for i, l in enumerate(lines) if l.lstrip('"').startswith('Kind')), None)
    if start is None:
        sys.exit(sys.argv[1] + ': no "Kind" header: not a cupti_trace CSV')
    total = collections.Counter()
    count = collections.Counter()
    for d in csv.DictReader(lines[start:]):
        if d.get('Kind') not in ('kernel', 'memcpy', 'memset'):
            continue
        try:
            n = float(d['Duration (ns)'])
        except (KeyError, ValueError, TypeError):
            continue
        name = d['Kind'] + ' ' + short_name(d.get('Name') or '?')
        total[name] += n
        count[name] += 1
    busy = sum(total.values())
    print(f'device busy {busy / 1e6:.1f} ms in {sum(count.values())} operations')
    for name, ns in total.most_common(top):
        print(f'{ns / 1e6:9.2f} ms {100 * ns / busy:5.1f}% {count[name]:7d}  {name}')


if __name__ == '__main__':
    main()
