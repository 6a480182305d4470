// A device timeline for any CUDA program, through CUPTI's activity API, for the GPU machine where
// Nsight Systems cannot make a report (its importer is missing there; .library/device/KINDS.md).
// The CUDA driver loads it into the program and calls InitializeInjection:
//
//   CUDA_INJECTION64_PATH=/path/libqcal_cupti_trace.so QCAL_CUPTI_TRACE=trace.csv qcal bench ...
//
// It records the device's kernels, copies and memsets and the host's CUDA runtime and driver API
// calls and synchronizations, and at exit writes one CSV row each:
//   Kind,Start (ns),Duration (ns),Name,Stream
// with Kind one of kernel, memcpy, memset (on the device) and runtime, driver, sync (on the host),
// all on CUPTI's one clock; Stream is the host's system thread id for runtime and driver rows.
// Without QCAL_CUPTI_TRACE the file is qcal_cupti_trace.csv in the working directory.
// tools/gpu/device_gaps.py reads it: where the device idles, and what the host was doing meanwhile.
// Records lost because a buffer was full are counted on stderr.
#include <cupti.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr size_t kBufferBytes = size_t{8} << 20;

struct Row {
  const char* kind;
  uint64_t start, end;
  std::string name;
  uint32_t stream;
};

std::mutex rows_mu;
std::vector<Row>* rows = new std::vector<Row>();  // never freed: written at exit
std::atomic<uint64_t> dropped{0};
std::atomic<bool> written{false};

void Warn(const char* what, CUptiResult r) {
  const char* text = nullptr;
  cuptiGetResultString(r, &text);
  std::fprintf(stderr, "qcal_cupti_trace: %s: %s\n", what, text != nullptr ? text : "?");
}

std::string ApiName(CUpti_CallbackDomain domain, uint32_t cbid) {
  const char* name = nullptr;
  if (cuptiGetCallbackName(domain, cbid, &name) == CUPTI_SUCCESS && name != nullptr) return name;
  return "api#" + std::to_string(cbid);
}

const char* SyncName(CUpti_ActivitySynchronizationType t) {
  switch (t) {
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_EVENT_SYNCHRONIZE:
      return "cudaEventSynchronize";
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_STREAM_WAIT_EVENT:
      return "cudaStreamWaitEvent";
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_STREAM_SYNCHRONIZE:
      return "cudaStreamSynchronize";
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_CONTEXT_SYNCHRONIZE:
      return "cudaDeviceSynchronize";
    default:
      return "synchronization";
  }
}

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<Row> got;
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
        got.push_back(
            {"kernel", k->start, k->end, k->name != nullptr ? k->name : "?", k->streamId});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
        const char* dir = m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "HtoD"
                          : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "DtoH"
                          : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOD ? "DtoD"
                                                                           : "other";
        got.push_back({"memcpy", m->start, m->end,
                       std::string("[memcpy ") + dir + " " + std::to_string(m->bytes) + "]",
                       m->streamId});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
        got.push_back({"memset", m->start, m->end, "[memset]", m->streamId});
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME:
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(record);
        const bool runtime = record->kind == CUPTI_ACTIVITY_KIND_RUNTIME;
        got.push_back(
            {runtime ? "runtime" : "driver", a->start, a->end,
             ApiName(runtime ? CUPTI_CB_DOMAIN_RUNTIME_API : CUPTI_CB_DOMAIN_DRIVER_API, a->cbid),
             a->threadId});
        break;
      }
      case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
        const auto* s = reinterpret_cast<const CUpti_ActivitySynchronization2*>(record);
        got.push_back({"sync", s->start, s->end, SyncName(s->type), s->streamId});
        break;
      }
      default:
        break;
    }
  }
  size_t lost = 0;
  if (cuptiActivityGetNumDroppedRecords(nullptr, 0, &lost) == CUPTI_SUCCESS) dropped += lost;
  std::free(buffer);
  std::lock_guard<std::mutex> lock(rows_mu);
  rows->insert(rows->end(), std::make_move_iterator(got.begin()),
               std::make_move_iterator(got.end()));
}

// CSV quoting: names of templated kernels hold commas.
std::string Quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

void WriteTrace() {
  if (written.exchange(true)) return;
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  const char* path = std::getenv("QCAL_CUPTI_TRACE");
  if (path == nullptr || *path == '\0') path = "qcal_cupti_trace.csv";
  std::lock_guard<std::mutex> lock(rows_mu);
  std::sort(rows->begin(), rows->end(),
            [](const Row& a, const Row& b) { return a.start < b.start; });
  FILE* f = std::fopen(path, "w");
  if (f == nullptr) {
    std::fprintf(stderr, "qcal_cupti_trace: cannot write %s: %s\n", path, std::strerror(errno));
    return;
  }
  std::fprintf(f, "Kind,Start (ns),Duration (ns),Name,Stream\n");
  for (const Row& r : *rows) {
    std::fprintf(f, "%s,%llu,%llu,%s,%u\n", r.kind, static_cast<unsigned long long>(r.start),
                 static_cast<unsigned long long>(r.end >= r.start ? r.end - r.start : 0),
                 Quoted(r.name).c_str(), r.stream);
  }
  std::fclose(f);
  std::fprintf(stderr, "qcal_cupti_trace: %zu records in %s (%llu dropped)\n", rows->size(), path,
               static_cast<unsigned long long>(dropped.load()));
}

}  // namespace

// Called by the CUDA driver when it loads this library (CUDA_INJECTION64_PATH).
extern "C" __attribute__((visibility("default"))) int InitializeInjection() {
  // The host rows' thread as the system's thread id (the default gave 0 for every row in the
  // first trace, 2026-12-06).
  CUptiResult r = cuptiSetThreadIdType(CUPTI_ACTIVITY_THREAD_ID_TYPE_SYSTEM);
  if (r != CUPTI_SUCCESS) Warn("cuptiSetThreadIdType", r);
  r = cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted);
  if (r != CUPTI_SUCCESS) {
    Warn("cuptiActivityRegisterCallbacks", r);
    return 0;
  }
  for (CUpti_ActivityKind kind :
       {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
        CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER,
        CUPTI_ACTIVITY_KIND_SYNCHRONIZATION}) {
    r = cuptiActivityEnable(kind);
    if (r != CUPTI_SUCCESS) Warn("cuptiActivityEnable", r);
  }
  std::atexit(WriteTrace);
  return 1;
}
