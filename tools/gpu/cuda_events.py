"""The GPU probes' timer (tools/gpu/*_probe*.py): the median of CUDA-event timings."""
import torch


def median_ms(fn, reps=20, warm=3):
    """Runs fn `warm` times, then times `reps` runs with CUDA events; the median in ms."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]
