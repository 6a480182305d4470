// Host memory of this process, for the per-job memory accounting (DESIGN section 2, "Memory").
//
// Linux: the resident set (VmRSS) and its high-water mark (VmHWM) from /proc/self/status. A
// long-lived process (the worker) resets the mark at the start of each job through
// /proc/self/clear_refs, so each job reports its own peak.
#pragma once

#include <cstdint>

namespace qcal {

// Resident set size now, in bytes (0 when /proc is unavailable).
int64_t CurrentRssBytes();
// The largest resident set size since the process started or since the last ResetPeakRss, in
// bytes (0 when /proc is unavailable).
int64_t PeakRssBytes();
// Starts a new high-water mark at the current resident set size. Returns false when the kernel
// refuses (the peak then covers the whole process lifetime).
bool ResetPeakRss();
// Memory the kernel could give this process without swapping (MemAvailable in /proc/meminfo), in
// bytes; -1 when unknown.
int64_t AvailableHostMemoryBytes();

}  // namespace qcal
