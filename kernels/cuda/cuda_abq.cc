#include "kernels/cuda/cuda_abq.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status.h"
#include "kernels/cuda/abq_gemm.cuh"
#include "kernels/cuda/cuda_resources.h"
#include "kernels/cuda/l2_evict.cuh"

namespace qcal::kernels {
namespace {

using cuda::CachingAllocator;
using cuda::CudaStatus;

constexpr int kWarmup = 3;
constexpr size_t kCublasWorkspaceBytes = 32 << 20;

absl::Status SizeError(const char* what, size_t got, int64_t want) {
  return absl::InvalidArgumentError(
      absl::StrCat("ABQ (CUDA): ", what, " has ", got, " elements, expected ", want));
}

// An uninitialised device buffer of `count` elements of T from the pool.
template <typename T>
struct DeviceArray {
  std::shared_ptr<Storage> storage;
  T* get() const { return storage ? static_cast<T*>(storage->data()) : nullptr; }
};

template <typename T>
absl::StatusOr<DeviceArray<T>> Allocate(CachingAllocator& alloc, int64_t count) {
  QCAL_ASSIGN_OR_RETURN(auto storage, alloc.Allocate(static_cast<size_t>(count) * sizeof(T)));
  return DeviceArray<T>{std::move(storage)};
}

template <typename T>
absl::Status Upload(const DeviceArray<T>& dst, std::span<const T> src, cudaStream_t stream) {
  return CudaStatus(
      cudaMemcpyAsync(dst.get(), src.data(), src.size_bytes(), cudaMemcpyHostToDevice, stream),
      "ABQ upload");
}

template <typename T>
absl::Status Download(std::vector<T>& dst, const DeviceArray<T>& src, int64_t count,
                      cudaStream_t stream) {
  dst.resize(static_cast<size_t>(count));
  QCAL_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(dst.data(), src.get(), count * sizeof(T), cudaMemcpyDeviceToHost, stream),
      "ABQ download"));
  return CudaStatus(cudaStreamSynchronize(stream), "ABQ download");
}

// Mean seconds of `run` on `stream` over `iters` runs after kWarmup untimed ones. Each run is
// timed alone by a pair of CUDA events, after a read of twice the L2 cache's size that evicts
// what the previous run left there (a read, so that L2 is left clean: after a memset the write-
// back of its dirty lines competed with the timed reads) and a read of the `hot_bytes` at `hot`
// (the layer's input activations, which the op before a layer has just written: in L2 in a real
// forward) that brings them back; both are outside the events. All runs are queued before the
// host waits, so the GPU never idles between a start event and its run.
template <typename Run>
absl::StatusOr<double> TimeOnStream(cudaStream_t stream, int iters, const void* hot,
                                    size_t hot_bytes, Run run) {
  if (iters < 1) return absl::InvalidArgumentError(absl::StrCat("iters must be >= 1, got ", iters));
  int device = 0, l2 = 0;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "L2 size"));
  const size_t evict_bytes = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
  void* evict = nullptr;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&evict, evict_bytes + 16), "L2 eviction buffer"));
  uint32_t* sink = reinterpret_cast<uint32_t*>(static_cast<char*>(evict) + evict_bytes);
  std::vector<cudaEvent_t> events(2 * static_cast<size_t>(iters), nullptr);
  absl::Status status = CudaStatus(cudaMemsetAsync(evict, 0, evict_bytes, stream), "L2 buffer");
  for (int i = 0; i < kWarmup && status.ok(); ++i) status = run();
  for (size_t e = 0; e < events.size() && status.ok(); ++e) {
    status = CudaStatus(cudaEventCreate(&events[e]), "cudaEventCreate");
  }
  for (int i = 0; i < iters && status.ok(); ++i) {
    status = CudaStatus(cuda::LaunchReadThrough(evict, evict_bytes, 0x9e3779b9u, sink, stream),
                        "L2 eviction");
    if (status.ok() && hot_bytes >= 16) {
      status =
          CudaStatus(cuda::LaunchReadThrough(hot, hot_bytes / 16 * 16, 0x9e3779b9u, sink, stream),
                     "L2 warm-up");
    }
    if (status.ok()) status = CudaStatus(cudaEventRecord(events[2 * i], stream), "event record");
    if (status.ok()) status = run();
    if (status.ok())
      status = CudaStatus(cudaEventRecord(events[2 * i + 1], stream), "event record");
  }
  if (status.ok()) status = CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  double total_ms = 0;
  for (int i = 0; i < iters && status.ok(); ++i) {
    float ms = 0;
    status = CudaStatus(cudaEventElapsedTime(&ms, events[2 * i], events[2 * i + 1]), "elapsed");
    total_ms += ms;
  }
  for (cudaEvent_t e : events) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  cudaFree(evict);
  QCAL_RETURN_IF_ERROR(status);
  return total_ms * 1e-3 / iters;
}

// How many copies of `bytes` of weights a sequence timing cycles through: enough that together
// they pass twice the L2 size, so that every call finds its weights evicted by the calls between
// it and the previous use of the same copy (at least 1). And the calls of one graph: a multiple
// of the copies, at least kSequenceCalls.
constexpr int kSequenceCalls = 32;
absl::StatusOr<int> SequenceCopies(double bytes) {
  int device = 0, l2 = 0;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "L2 size"));
  return std::max(1, static_cast<int>(std::ceil(2.0 * std::max(l2, 1 << 20) / bytes)));
}
int SequenceCalls(int copies) { return copies * ((kSequenceCalls + copies - 1) / copies); }

// Mean seconds of one call when `calls` calls, enqueue(0) .. enqueue(calls - 1), run back to back
// as one CUDA graph (captured from `stream`; the launches' programmatic dependencies are kept),
// timed as TimeOnStream times a run: each graph launch alone between its events, after the L2
// eviction and the read of `hot`. The calls are first run once outside the graph, so that pools
// and kernel attributes are set up before the capture.
template <typename Enqueue>
absl::StatusOr<double> TimeGraphOnStream(cudaStream_t stream, int calls, int iters, const void* hot,
                                         size_t hot_bytes, Enqueue enqueue) {
  for (int c = 0; c < calls; ++c) QCAL_RETURN_IF_ERROR(enqueue(c));
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                                  "graph capture"));
  absl::Status status = absl::OkStatus();
  for (int c = 0; c < calls && status.ok(); ++c) status = enqueue(c);
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (status.ok()) status = CudaStatus(end, "graph capture");
  cudaGraphExec_t exec = nullptr;
  if (status.ok()) status = CudaStatus(cudaGraphInstantiate(&exec, graph, 0), "graph instantiate");
  double seconds = 0;
  if (status.ok()) {
    absl::StatusOr<double> timed =
        TimeOnStream(stream, iters, hot, hot_bytes, [&]() -> absl::Status {
          return CudaStatus(cudaGraphLaunch(exec, stream), "graph launch");
        });
    if (timed.ok()) {
      seconds = *timed / calls;
    } else {
      status = timed.status();
    }
  }
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  if (graph != nullptr) cudaGraphDestroy(graph);
  QCAL_RETURN_IF_ERROR(status);
  return seconds;
}

// s_w and z as one word each (z << 16 | the fp16 bits of s_w; AbqDeviceWeights::meta), or
// nothing when some scale is not an fp16 value.
std::vector<uint32_t> CompactAbqMeta(const std::vector<float>& scales,
                                     const std::vector<int32_t>& zeros) {
  std::vector<uint32_t> meta(scales.size());
  for (size_t i = 0; i < scales.size(); ++i) {
    const uint16_t h = FloatToHalf(scales[i]);
    if (std::bit_cast<uint32_t>(HalfToFloat(h)) != std::bit_cast<uint32_t>(scales[i])) return {};
    meta[i] = static_cast<uint32_t>(zeros[i]) << 16 | h;
  }
  return meta;
}

absl::Status CheckTokens(int64_t m) {
  if (m < 1 || m > kAbqMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("ABQ (CUDA): m must be in [1, ", kAbqMaxTokens, "], got ", m));
  }
  return absl::OkStatus();
}

}  // namespace

struct CudaAbqLinear::State {
  int device = 0;
  AbqSpec spec;
  int64_t n = 0, k = 0, words = 0, n_groups = 0, group_words = 0;
  // The instance's own stream (Create without one), else empty and `stream` is the caller's.
  std::optional<cuda::CudaStream> own_stream;
  cudaStream_t stream = nullptr;
  std::shared_ptr<CachingAllocator> alloc;
  B1Kernel b1 = B1Kernel::kDispatch;
  DeviceArray<uint32_t> planes;
  DeviceArray<float> scales;
  DeviceArray<int32_t> zeros;
  // s_w and z as one word each, for the fused kernel: made when it is first chosen (MakeMeta),
  // and only where every scale is an fp16 value.
  DeviceArray<uint32_t> meta;
  bool meta_made = false;
  // The dp4a kernel's digits and row-major meta words: made when it is first chosen (MakeDigits),
  // with the scratch its activation kernel writes the token's codes into (one call at a time: the
  // calls on `stream` are ordered).
  DeviceArray<uint32_t> digits;
  DeviceArray<uint32_t> meta_rows;
  DeviceArray<uint32_t> dp4a_scratch;
  bool digits_made = false;

  cuda::AbqDeviceWeights Weights() const {
    cuda::AbqDeviceWeights w;
    w.planes = planes.get();
    w.scales = scales.get();
    w.zeros = zeros.get();
    w.meta = meta.get();
    w.digits = digits.get();
    w.meta_rows = meta_rows.get();
    w.n = n;
    w.k = k;
    w.words = static_cast<int>(words);
    w.group_words = static_cast<int>(group_words);
    w.n_groups = static_cast<int>(n_groups);
    w.weight_bits = spec.weight_bits;
    return w;
  }

  // Device activations of m tokens (uninitialised).
  struct Activations {
    DeviceArray<uint32_t> planes;
    DeviceArray<float> scales;
    DeviceArray<int32_t> sums;
    cuda::AbqDeviceActivations View(int64_t m, int act_bits) const {
      return {planes.get(), scales.get(), sums.get(), m, act_bits};
    }
  };
  absl::StatusOr<Activations> AllocateActivations(int64_t m) {
    Activations a;
    QCAL_ASSIGN_OR_RETURN(a.planes, Allocate<uint32_t>(*alloc, m * spec.act_bits * words));
    QCAL_ASSIGN_OR_RETURN(a.scales, Allocate<float>(*alloc, m));
    QCAL_ASSIGN_OR_RETURN(a.sums, Allocate<int32_t>(*alloc, m * n_groups));
    return a;
  }

  // The GEMM (integer kernels) or the weight-only GEMM into y, on the stream; b1 picks the
  // kernel of kBinaryMma.
  absl::Status Launch(AbqKernel kernel, const float* x, const Activations* a, int64_t m, float* y,
                      int32_t* dot) {
    return Launch(Weights(), kernel, x, a, m, y, dot);
  }
  // The same on weights `w` (of this layer's shape: a copy's, for the sequence timing).
  absl::Status Launch(const cuda::AbqDeviceWeights& w, AbqKernel kernel, const float* x,
                      const Activations* a, int64_t m, float* y, int32_t* dot) {
    cudaError_t err;
    if (kernel == AbqKernel::kWeightOnly) {
      err = cuda::LaunchAbqWeightOnly(x, m, w, y, stream);
    } else {
      cuda::AbqMma mma = cuda::AbqMma::kInt8;
      if (kernel == AbqKernel::kBinaryMma) {
        mma = b1 == B1Kernel::kTiled    ? cuda::AbqMma::kBinaryTiled
              : b1 == B1Kernel::kDecode ? cuda::AbqMma::kBinaryRing
                                        : cuda::AbqMma::kBinary;
      }
      err = cuda::LaunchAbqGemm(mma, w, a->View(m, spec.act_bits), y, dot, stream);
    }
    return CudaStatus(err, absl::StrCat("ABQ GEMM (", AbqKernelName(kernel), ")"));
  }
  // Makes `meta` from the device's scales and zero points (once; nothing where a scale is not an
  // fp16 value).
  absl::Status MakeMeta() {
    if (meta_made) return absl::OkStatus();
    std::vector<float> host_scales;
    std::vector<int32_t> host_zeros;
    QCAL_RETURN_IF_ERROR(Download(host_scales, scales, n_groups * n, stream));
    QCAL_RETURN_IF_ERROR(Download(host_zeros, zeros, n_groups * n, stream));
    const std::vector<uint32_t> words = CompactAbqMeta(host_scales, host_zeros);
    if (!words.empty()) {
      QCAL_ASSIGN_OR_RETURN(meta, Allocate<uint32_t>(*alloc, n_groups * n));
      QCAL_RETURN_IF_ERROR(Upload(meta, std::span<const uint32_t>(words), stream));
      // The host vector goes when this returns.
      QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "ABQ meta upload"));
    }
    meta_made = true;
    fused_one_token.reset();  // the plan depends on the meta words
    return absl::OkStatus();
  }
  // Makes the dp4a kernel's digits from the planes on the device, and `meta`'s words row-major
  // (once; no meta rows where a scale is not an fp16 value).
  absl::Status MakeDigits() {
    if (digits_made) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(MakeMeta());
    if (k % 64 == 0) {
      QCAL_ASSIGN_OR_RETURN(digits, Allocate<uint32_t>(*alloc, cuda::AbqDigitWords(Weights())));
      QCAL_RETURN_IF_ERROR(CudaStatus(cuda::LaunchAbqRepackDigits(Weights(), digits.get(), stream),
                                      "ABQ digit repack"));
      // The dp4a kernel reads its digits before griddepcontrol.wait (programmatic launch): the
      // repack must be complete before any launch of it.
      QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "ABQ digit repack"));
      QCAL_ASSIGN_OR_RETURN(dp4a_scratch,
                            Allocate<uint32_t>(*alloc, cuda::AbqDp4aScratchBytes(Weights()) / 4));
    }
    if (meta.get() != nullptr) {
      std::vector<uint32_t> words;
      QCAL_RETURN_IF_ERROR(Download(words, meta, n_groups * n, stream));
      std::vector<uint32_t> rows(words.size());
      for (int64_t g = 0; g < n_groups; ++g) {
        for (int64_t o = 0; o < n; ++o) rows[o * n_groups + g] = words[g * n + o];
      }
      QCAL_ASSIGN_OR_RETURN(meta_rows, Allocate<uint32_t>(*alloc, n_groups * n));
      QCAL_RETURN_IF_ERROR(Upload(meta_rows, std::span<const uint32_t>(rows), stream));
      QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "ABQ meta rows upload"));
    }
    digits_made = true;
    dp4a_one_token.reset();  // asked again with the digits
    return absl::OkStatus();
  }
  // Whether the fused (or dp4a) kernel takes one token of this layer (AbqFusedGemvApplies plans
  // the launch: asked once, not on every call; the weights, meta words and device do not change).
  mutable std::optional<bool> fused_one_token;
  mutable std::optional<bool> dp4a_one_token;
  bool FusedTakesOneToken() const {
    if (!fused_one_token) {
      fused_one_token = cuda::AbqFusedGemvApplies(Weights(), 1, spec.act_bits);
    }
    return *fused_one_token;
  }
  bool Dp4aTakesOneToken() const {
    if (!dp4a_one_token) {
      dp4a_one_token =
          digits.get() != nullptr && cuda::AbqDp4aGemvApplies(Weights(), 1, spec.act_bits);
    }
    return *dp4a_one_token;
  }
  // Whether a whole-layer call of m tokens through `kernel` from x into y runs a one-token layer
  // kernel from x (the fused b1 layer in one launch, or the dp4a one in two): x 16-byte aligned,
  // and x and y apart (the fused layer's blocks write y while others still read x).
  bool Fused(AbqKernel kernel, int64_t m, const float* x, const float* y) const {
    const auto at = [](const float* p) { return reinterpret_cast<uintptr_t>(p); };
    const bool apart = at(x + m * k) <= at(y) || at(y + m * n) <= at(x);
    if (kernel != AbqKernel::kBinaryMma || m != 1 || at(x) % 16 != 0 || !apart) return false;
    if (b1 == B1Kernel::kFused) return FusedTakesOneToken();
    return b1 == B1Kernel::kDp4a && Dp4aTakesOneToken();
  }
  // The one-token layer (fused b1 or dp4a) on weights `w` (this layer's or a copy's).
  absl::Status LaunchFused(const cuda::AbqDeviceWeights& w, const float* x, float* y,
                           int32_t* dot) {
    if (b1 == B1Kernel::kDp4a) {
      return CudaStatus(
          cuda::LaunchAbqDp4aGemv(x, w, spec.act_bits, y, dot, dp4a_scratch.get(), stream),
          "ABQ one-token layer (dp4a)");
    }
    return CudaStatus(cuda::LaunchAbqFusedGemv(x, w, spec.act_bits, y, dot, stream),
                      "ABQ fused GEMV (b1)");
  }
  absl::Status Prologue(const float* x, const Activations& a, int64_t m) {
    return Prologue(Weights(), x, a, m);
  }
  absl::Status Prologue(const cuda::AbqDeviceWeights& w, const float* x, const Activations& a,
                        int64_t m) {
    return CudaStatus(cuda::LaunchAbqPrologue(x, w, a.View(m, spec.act_bits), stream),
                      "ABQ prologue");
  }
};

CudaAbqLinear::CudaAbqLinear(std::unique_ptr<State> state) : state_(std::move(state)) {}

CudaAbqLinear::~CudaAbqLinear() {
  // A caller's stream and pool need nothing: the memory goes back to the pool in that stream's
  // order. The own pool is freed with the instance: its stream's work must be done first.
  if (state_ != nullptr && state_->own_stream && cuda::UseDevice(state_->device).ok()) {
    cudaStreamSynchronize(state_->stream);
  }
}

const AbqSpec& CudaAbqLinear::spec() const { return state_->spec; }
int64_t CudaAbqLinear::n() const { return state_->n; }
int64_t CudaAbqLinear::k() const { return state_->k; }

absl::StatusOr<std::unique_ptr<CudaAbqLinear>> CudaAbqLinear::Create(const AbqWeights& w,
                                                                     int device) {
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device));
  QCAL_ASSIGN_OR_RETURN(cuda::CudaStream stream, cuda::CudaStream::Create());
  const cudaStream_t s = stream.get();
  auto pool = std::make_shared<CachingAllocator>(device, cuda::MemoryKind::kDevice);
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<CudaAbqLinear> linear,
                        Create(w, device, s, std::move(pool)));
  linear->state_->own_stream = std::move(stream);
  return linear;
}

absl::StatusOr<std::unique_ptr<CudaAbqLinear>> CudaAbqLinear::Create(
    const AbqWeights& w, int device, CUstream_st* stream,
    std::shared_ptr<cuda::CachingAllocator> pool) {
  QCAL_RETURN_IF_ERROR(ValidateAbqWeights(w));
  const int64_t words = w.words, n_groups = w.n_groups;
  const int64_t n_planes = w.n * w.spec.weight_bits * words;
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device));
  auto state = std::make_unique<State>();
  state->device = device;
  state->spec = w.spec;
  state->n = w.n;
  state->k = w.k;
  state->words = words;
  state->n_groups = n_groups;
  state->group_words = n_groups == 1 ? words : AbqGroupSize(w.spec, w.k) / kAbqWordBits;
  state->stream = stream;
  state->alloc = std::move(pool);
  QCAL_ASSIGN_OR_RETURN(state->planes, Allocate<uint32_t>(*state->alloc, n_planes));
  QCAL_ASSIGN_OR_RETURN(state->scales, Allocate<float>(*state->alloc, n_groups * w.n));
  QCAL_ASSIGN_OR_RETURN(state->zeros, Allocate<int32_t>(*state->alloc, n_groups * w.n));
  QCAL_RETURN_IF_ERROR(Upload(state->planes, std::span<const uint32_t>(w.planes), stream));
  QCAL_RETURN_IF_ERROR(Upload(state->scales, std::span<const float>(w.scales), stream));
  QCAL_RETURN_IF_ERROR(Upload(state->zeros, std::span<const int32_t>(w.zeros), stream));
  // The host vectors may be released as soon as we return.
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "ABQ weight upload"));
  return std::unique_ptr<CudaAbqLinear>(new CudaAbqLinear(std::move(state)));
}

absl::Status CudaAbqLinear::ForwardDevice(const float* x, int64_t m, AbqKernel kernel, float* y) {
  State& st = *state_;
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(st.spec, m, st.n, st.k));
  QCAL_RETURN_IF_ERROR(CheckTokens(m));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(st.device));
  if (st.Fused(kernel, m, x, y)) return st.LaunchFused(st.Weights(), x, y, nullptr);
  // The activations go back to the pool when this returns, before the kernels ran: the pool
  // hands them out again only to work queued behind them on the same stream.
  State::Activations da;
  if (kernel != AbqKernel::kWeightOnly) {
    QCAL_ASSIGN_OR_RETURN(da, st.AllocateActivations(m));
    QCAL_RETURN_IF_ERROR(st.Prologue(x, da, m));
  }
  return st.Launch(kernel, x, &da, m, y, nullptr);
}

absl::StatusOr<AbqActivations> CudaAbqLinear::QuantizeActivations(std::span<const float> x,
                                                                  int64_t m) {
  State& st = *state_;
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(st.spec, m, st.n, st.k));
  QCAL_RETURN_IF_ERROR(CheckTokens(m));
  if (static_cast<int64_t>(x.size()) != m * st.k) return SizeError("x", x.size(), m * st.k);
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(st.device));
  const cudaStream_t s = st.stream;
  QCAL_ASSIGN_OR_RETURN(DeviceArray<float> dx, Allocate<float>(*st.alloc, m * st.k));
  QCAL_ASSIGN_OR_RETURN(State::Activations da, st.AllocateActivations(m));
  QCAL_RETURN_IF_ERROR(Upload(dx, x, s));
  QCAL_RETURN_IF_ERROR(st.Prologue(dx.get(), da, m));
  AbqActivations a;
  a.spec = st.spec;
  a.m = m;
  a.k = st.k;
  a.words = st.words;
  a.n_groups = st.n_groups;
  QCAL_RETURN_IF_ERROR(Download(a.planes, da.planes, m * st.spec.act_bits * st.words, s));
  QCAL_RETURN_IF_ERROR(Download(a.scales, da.scales, m, s));
  QCAL_RETURN_IF_ERROR(Download(a.sums, da.sums, m * st.n_groups, s));
  return a;
}

absl::StatusOr<std::vector<float>> CudaAbqLinear::Forward(std::span<const float> x, int64_t m,
                                                          AbqKernel kernel,
                                                          std::vector<int32_t>* dot) {
  State& st = *state_;
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(st.spec, m, st.n, st.k));
  QCAL_RETURN_IF_ERROR(CheckTokens(m));
  if (static_cast<int64_t>(x.size()) != m * st.k) return SizeError("x", x.size(), m * st.k);
  if (kernel == AbqKernel::kWeightOnly && dot != nullptr) {
    return absl::InvalidArgumentError("ABQ (CUDA): the weight-only kernel has no integer sums");
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(st.device));
  const cudaStream_t s = st.stream;
  QCAL_ASSIGN_OR_RETURN(DeviceArray<float> dx, Allocate<float>(*st.alloc, m * st.k));
  QCAL_ASSIGN_OR_RETURN(DeviceArray<float> dy, Allocate<float>(*st.alloc, m * st.n));
  DeviceArray<int32_t> ddot;
  if (dot != nullptr) {
    QCAL_ASSIGN_OR_RETURN(ddot, Allocate<int32_t>(*st.alloc, m * st.n * st.n_groups));
  }
  QCAL_RETURN_IF_ERROR(Upload(dx, x, s));
  State::Activations da;
  if (st.Fused(kernel, m, dx.get(), dy.get())) {
    QCAL_RETURN_IF_ERROR(st.LaunchFused(st.Weights(), dx.get(), dy.get(), ddot.get()));
  } else {
    if (kernel != AbqKernel::kWeightOnly) {
      QCAL_ASSIGN_OR_RETURN(da, st.AllocateActivations(m));
      QCAL_RETURN_IF_ERROR(st.Prologue(dx.get(), da, m));
    }
    QCAL_RETURN_IF_ERROR(st.Launch(kernel, dx.get(), &da, m, dy.get(), ddot.get()));
  }
  std::vector<float> y;
  QCAL_RETURN_IF_ERROR(Download(y, dy, m * st.n, s));
  if (dot != nullptr) QCAL_RETURN_IF_ERROR(Download(*dot, ddot, m * st.n * st.n_groups, s));
  return y;
}

absl::StatusOr<std::vector<float>> CudaAbqLinear::Gemm(const AbqActivations& a, AbqKernel kernel,
                                                       std::vector<int32_t>* dot) {
  State& st = *state_;
  if (kernel == AbqKernel::kWeightOnly) {
    return absl::InvalidArgumentError(
        "ABQ (CUDA): Gemm takes packed activations; the weight-only kernel takes x (Forward)");
  }
  if (a.spec.weight_bits != st.spec.weight_bits || a.spec.act_bits != st.spec.act_bits ||
      AbqGroupSize(a.spec, a.k) != AbqGroupSize(st.spec, st.k) || a.k != st.k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ABQ (CUDA): activations W", a.spec.weight_bits, "A", a.spec.act_bits, " g",
        a.spec.group_size, " k ", a.k, " do not match the weights' W", st.spec.weight_bits, "A",
        st.spec.act_bits, " g", st.spec.group_size, " k ", st.k));
  }
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(st.spec, a.m, st.n, st.k));
  QCAL_RETURN_IF_ERROR(CheckTokens(a.m));
  const int64_t m = a.m;
  if (static_cast<int64_t>(a.planes.size()) != m * st.spec.act_bits * st.words) {
    return SizeError("activation planes", a.planes.size(), m * st.spec.act_bits * st.words);
  }
  if (static_cast<int64_t>(a.scales.size()) != m) {
    return SizeError("activation scales", a.scales.size(), m);
  }
  if (static_cast<int64_t>(a.sums.size()) != m * st.n_groups) {
    return SizeError("activation sums", a.sums.size(), m * st.n_groups);
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(st.device));
  const cudaStream_t s = st.stream;
  QCAL_ASSIGN_OR_RETURN(State::Activations da, st.AllocateActivations(m));
  QCAL_ASSIGN_OR_RETURN(DeviceArray<float> dy, Allocate<float>(*st.alloc, m * st.n));
  DeviceArray<int32_t> ddot;
  if (dot != nullptr) {
    QCAL_ASSIGN_OR_RETURN(ddot, Allocate<int32_t>(*st.alloc, m * st.n * st.n_groups));
  }
  QCAL_RETURN_IF_ERROR(Upload(da.planes, std::span<const uint32_t>(a.planes), s));
  QCAL_RETURN_IF_ERROR(Upload(da.scales, std::span<const float>(a.scales), s));
  QCAL_RETURN_IF_ERROR(Upload(da.sums, std::span<const int32_t>(a.sums), s));
  QCAL_RETURN_IF_ERROR(st.Launch(kernel, nullptr, &da, m, dy.get(), ddot.get()));
  std::vector<float> y;
  QCAL_RETURN_IF_ERROR(Download(y, dy, m * st.n, s));
  if (dot != nullptr) QCAL_RETURN_IF_ERROR(Download(*dot, ddot, m * st.n * st.n_groups, s));
  return y;
}

absl::Status CudaAbqLinear::set_b1_kernel(B1Kernel b1) {
  if (b1 == B1Kernel::kFused) {
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(state_->device));
    QCAL_RETURN_IF_ERROR(state_->MakeMeta());
  }
  if (b1 == B1Kernel::kDp4a) {
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(state_->device));
    QCAL_RETURN_IF_ERROR(state_->MakeDigits());
  }
  state_->b1 = b1;
  return absl::OkStatus();
}

bool CudaAbqLinear::HasCompactMeta() const { return state_->meta.get() != nullptr; }

bool CudaAbqLinear::FusedApplies(int64_t m) const {
  return m == 1 && cuda::UseDevice(state_->device).ok() && state_->FusedTakesOneToken();
}

bool CudaAbqLinear::Dp4aApplies(int64_t m) const {
  return m == 1 && cuda::UseDevice(state_->device).ok() && state_->Dp4aTakesOneToken();
}

absl::StatusOr<double> CudaAbqLinear::TimeForward(int64_t m, AbqKernel kernel, int iters, Part part,
                                                  AbqTiming timing) {
  State& st = *state_;
  if (part != Part::kWhole && kernel == AbqKernel::kWeightOnly) {
    return absl::InvalidArgumentError(
        "ABQ (CUDA): the weight-only kernel has no prologue to time apart");
  }
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(st.spec, m, st.n, st.k));
  QCAL_RETURN_IF_ERROR(CheckTokens(m));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(st.device));
  const cudaStream_t s = st.stream;
  std::vector<float> x(static_cast<size_t>(m * st.k));
  std::mt19937 gen(static_cast<uint32_t>(m * 7919 + st.k));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (float& v : x) v = dist(gen);
  QCAL_ASSIGN_OR_RETURN(DeviceArray<float> dx, Allocate<float>(*st.alloc, m * st.k));
  QCAL_ASSIGN_OR_RETURN(DeviceArray<float> dy, Allocate<float>(*st.alloc, m * st.n));
  QCAL_ASSIGN_OR_RETURN(State::Activations da, st.AllocateActivations(m));
  QCAL_RETURN_IF_ERROR(Upload(dx, std::span<const float>(x), s));
  const bool fused = st.Fused(kernel, m, dx.get(), dy.get());
  if (fused && part != Part::kWhole) {
    return absl::InvalidArgumentError(
        "ABQ (CUDA): the one-token layer (fused b1: one launch; dp4a: its own two) has no b1 "
        "prologue or GEMM to time apart");
  }
  if (part == Part::kGemm) QCAL_RETURN_IF_ERROR(st.Prologue(dx.get(), da, m));
  // One call on weights w: the layer, or the part of it being timed.
  auto call = [&](const cuda::AbqDeviceWeights& w) -> absl::Status {
    if (fused) return st.LaunchFused(w, dx.get(), dy.get(), nullptr);
    if (kernel != AbqKernel::kWeightOnly && part != Part::kGemm) {
      QCAL_RETURN_IF_ERROR(st.Prologue(w, dx.get(), da, m));
    }
    if (part == Part::kPrologue) return absl::OkStatus();
    return st.Launch(w, kernel, dx.get(), &da, m, dy.get(), nullptr);
  };
  if (timing == AbqTiming::kAlone) {
    return TimeOnStream(s, iters, dx.get(), x.size() * sizeof(float),
                        [&]() { return call(st.Weights()); });
  }
  // The sequence: copies of the weights (planes, scales, zero points) made on the device.
  const int64_t n_planes = st.n * st.spec.weight_bits * st.words, n_scales = st.n_groups * st.n;
  // Enough copies of what the timed kernel reads: the dp4a kernel's digits and one-word meta
  // where it runs, else the planes, scales and zero points.
  const bool dp4a = fused && st.b1 == B1Kernel::kDp4a;
  const double read_bytes =
      dp4a ? 4.0 * static_cast<double>(cuda::AbqDigitWords(st.Weights())) +
                 (st.meta_rows.get() != nullptr ? 4.0 : 8.0) * static_cast<double>(n_scales)
           : 4.0 * static_cast<double>(n_planes) + 8.0 * static_cast<double>(n_scales);
  QCAL_ASSIGN_OR_RETURN(const int copies, SequenceCopies(read_bytes));
  struct Copy {
    DeviceArray<uint32_t> planes;
    DeviceArray<float> scales;
    DeviceArray<int32_t> zeros;
    DeviceArray<uint32_t> meta;
    DeviceArray<uint32_t> digits;
    DeviceArray<uint32_t> meta_rows;
  };
  std::vector<Copy> held(static_cast<size_t>(copies - 1));
  std::vector<cuda::AbqDeviceWeights> weights(1, st.Weights());
  for (Copy& c : held) {
    QCAL_ASSIGN_OR_RETURN(c.planes, Allocate<uint32_t>(*st.alloc, n_planes));
    QCAL_ASSIGN_OR_RETURN(c.scales, Allocate<float>(*st.alloc, n_scales));
    QCAL_ASSIGN_OR_RETURN(c.zeros, Allocate<int32_t>(*st.alloc, n_scales));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(c.planes.get(), st.planes.get(), n_planes * sizeof(uint32_t),
                                   cudaMemcpyDeviceToDevice, s),
                   "ABQ weight copy"));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(c.scales.get(), st.scales.get(), n_scales * sizeof(float),
                                   cudaMemcpyDeviceToDevice, s),
                   "ABQ weight copy"));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(c.zeros.get(), st.zeros.get(), n_scales * sizeof(int32_t),
                                   cudaMemcpyDeviceToDevice, s),
                   "ABQ weight copy"));
    if (st.meta.get() != nullptr) {
      QCAL_ASSIGN_OR_RETURN(c.meta, Allocate<uint32_t>(*st.alloc, n_scales));
      QCAL_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(c.meta.get(), st.meta.get(), n_scales * sizeof(uint32_t),
                                     cudaMemcpyDeviceToDevice, s),
                     "ABQ weight copy"));
    }
    // The dp4a kernel's digits and meta rows (where it runs: copies of them instead).
    auto copy_words = [&](DeviceArray<uint32_t>& dst, const DeviceArray<uint32_t>& src,
                          int64_t count) -> absl::Status {
      if (src.get() == nullptr) return absl::OkStatus();
      QCAL_ASSIGN_OR_RETURN(dst, Allocate<uint32_t>(*st.alloc, count));
      return CudaStatus(cudaMemcpyAsync(dst.get(), src.get(), count * sizeof(uint32_t),
                                        cudaMemcpyDeviceToDevice, s),
                        "ABQ weight copy");
    };
    if (dp4a) {
      QCAL_RETURN_IF_ERROR(copy_words(c.digits, st.digits, cuda::AbqDigitWords(st.Weights())));
      QCAL_RETURN_IF_ERROR(copy_words(c.meta_rows, st.meta_rows, n_scales));
    }
    cuda::AbqDeviceWeights w = st.Weights();
    w.digits = c.digits.get() != nullptr ? c.digits.get() : w.digits;
    w.meta_rows = c.meta_rows.get() != nullptr ? c.meta_rows.get() : w.meta_rows;
    w.planes = c.planes.get();
    w.scales = c.scales.get();
    w.zeros = c.zeros.get();
    w.meta = c.meta.get();
    weights.push_back(w);
  }
  return TimeGraphOnStream(s, SequenceCalls(copies), iters, dx.get(), x.size() * sizeof(float),
                           [&](int c) { return call(weights[c % copies]); });
}

absl::StatusOr<double> TimeNullLaunch(int device, int iters, AbqTiming timing) {
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device));
  QCAL_ASSIGN_OR_RETURN(cuda::CudaStream stream, cuda::CudaStream::Create());
  auto alloc = std::make_shared<CachingAllocator>(device, cuda::MemoryKind::kDevice);
  QCAL_ASSIGN_OR_RETURN(auto buf, alloc->Allocate(32));
  const cudaStream_t s = stream.get();
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(buf->data(), 0, 32, s), "memset"));
  uint32_t* sink = reinterpret_cast<uint32_t*>(static_cast<char*>(buf->data()) + 16);
  auto call = [&]() -> absl::Status {
    return CudaStatus(cuda::LaunchReadThrough(buf->data(), 16, 1, sink, s), "null kernel");
  };
  if (timing == AbqTiming::kAlone) return TimeOnStream(s, iters, nullptr, 0, call);
  return TimeGraphOnStream(s, kSequenceCalls, iters, nullptr, 0, [&](int) { return call(); });
}

absl::StatusOr<double> TimeReadFloor(double bytes, int device, int iters, AbqTiming timing) {
  if (!(bytes >= 16) || bytes > 1e12) {
    return absl::InvalidArgumentError(absl::StrCat("read floor: bad byte count ", bytes));
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device));
  QCAL_ASSIGN_OR_RETURN(cuda::CudaStream stream, cuda::CudaStream::Create());
  auto alloc = std::make_shared<CachingAllocator>(device, cuda::MemoryKind::kDevice);
  const size_t size = (static_cast<size_t>(std::ceil(bytes)) + 15) / 16 * 16;
  const cudaStream_t s = stream.get();
  int copies = 1;
  if (timing == AbqTiming::kSequence) {
    QCAL_ASSIGN_OR_RETURN(copies, SequenceCopies(static_cast<double>(size)));
  }
  QCAL_ASSIGN_OR_RETURN(auto sink_buf, alloc->Allocate(16));
  uint32_t* sink = static_cast<uint32_t*>(sink_buf->data());
  std::vector<std::shared_ptr<Storage>> bufs;
  for (int c = 0; c < copies; ++c) {
    QCAL_ASSIGN_OR_RETURN(auto b, alloc->Allocate(size));
    QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(b->data(), 0, size, s), "memset"));
    bufs.push_back(std::move(b));
  }
  // Key 1: the XOR of zeros never matches, so nothing is written.
  auto call = [&](int c) -> absl::Status {
    return CudaStatus(
        cuda::LaunchReadFloor(bufs[static_cast<size_t>(c % copies)]->data(), size, 1, sink, s),
        "read floor");
  };
  if (timing == AbqTiming::kAlone)
    return TimeOnStream(s, iters, nullptr, 0, [&]() { return call(0); });
  return TimeGraphOnStream(s, SequenceCalls(copies), iters, nullptr, 0, call);
}

absl::StatusOr<double> TimeCublasGemm(bool int8, int64_t m, int64_t n, int64_t k, int device,
                                      int iters, AbqTiming timing) {
  if (m < 1 || n < 1 || k < 1 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuBLAS GEMM: bad shape m ", m, ", n ", n, ", k ", k));
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device));
  QCAL_ASSIGN_OR_RETURN(cuda::CudaStream stream, cuda::CudaStream::Create());
  QCAL_ASSIGN_OR_RETURN(cuda::CublasHandle handle, cuda::CublasHandle::Create(stream.get()));
  auto alloc = std::make_shared<CachingAllocator>(device, cuda::MemoryKind::kDevice);
  const size_t in_bytes = int8 ? 1 : 2, out_bytes = int8 ? 4 : 2;
  const cudaStream_t s = stream.get();
  // One copy of the weights, or (sequence) enough copies to pass twice the L2 size.
  const double w_bytes = static_cast<double>(n * k) * static_cast<double>(in_bytes);
  int copies = 1;
  if (timing == AbqTiming::kSequence) {
    QCAL_ASSIGN_OR_RETURN(copies, SequenceCopies(w_bytes));
  }
  std::vector<std::shared_ptr<Storage>> w;
  for (int c = 0; c < copies; ++c) {
    QCAL_ASSIGN_OR_RETURN(auto wc, alloc->Allocate(static_cast<size_t>(n * k) * in_bytes));
    QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(wc->data(), 0, wc->bytes(), s), "memset"));
    w.push_back(std::move(wc));
  }
  QCAL_ASSIGN_OR_RETURN(auto x, alloc->Allocate(static_cast<size_t>(m * k) * in_bytes));
  QCAL_ASSIGN_OR_RETURN(auto y, alloc->Allocate(static_cast<size_t>(m * n) * out_bytes));
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(x->data(), 0, x->bytes(), s), "memset"));
  // A workspace of its own, so that cuBLAS allocates nothing while a graph is captured.
  QCAL_ASSIGN_OR_RETURN(auto workspace, alloc->Allocate(kCublasWorkspaceBytes));
  QCAL_RETURN_IF_ERROR(cuda::CublasStatus(
      cublasSetWorkspace(handle.get(), workspace->data(), workspace->bytes()), "cuBLAS workspace"));
  // Column-major: y (n × m, ld n) = W (k × n, ld k)ᵀ · x (k × m, ld k).
  const int in = static_cast<int>(n), im = static_cast<int>(m), ik = static_cast<int>(k);
  const float alpha_f = 1.0f, beta_f = 0.0f;
  const int32_t alpha_i = 1, beta_i = 0;
  auto call = [&](int c) -> absl::Status {
    const void* wc = w[static_cast<size_t>(c % copies)]->data();
    cublasStatus_t status;
    if (int8) {
      status = cublasGemmEx(handle.get(), CUBLAS_OP_T, CUBLAS_OP_N, in, im, ik, &alpha_i, wc,
                            CUDA_R_8I, ik, x->data(), CUDA_R_8I, ik, &beta_i, y->data(), CUDA_R_32I,
                            in, CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT);
    } else {
      status = cublasGemmEx(handle.get(), CUBLAS_OP_T, CUBLAS_OP_N, in, im, ik, &alpha_f, wc,
                            CUDA_R_16BF, ik, x->data(), CUDA_R_16BF, ik, &beta_f, y->data(),
                            CUDA_R_16BF, in, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    return cuda::CublasStatus(status, int8 ? "cublasGemmEx int8" : "cublasGemmEx bf16");
  };
  if (timing == AbqTiming::kAlone) {
    return TimeOnStream(s, iters, x->data(), x->bytes(), [&]() { return call(0); });
  }
  return TimeGraphOnStream(s, SequenceCalls(copies), iters, x->data(), x->bytes(), call);
}

}  // namespace qcal::kernels
