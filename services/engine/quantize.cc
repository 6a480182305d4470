#include "services/engine/quantize.h"

#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "common/text_data.h"

namespace qcal::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

absl::Status CheckFinite(const Tensor& host, const std::string& what) {
  const float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    if (!std::isfinite(p[i])) {
      return absl::InvalidArgumentError(absl::StrCat(what, " contains NaN or Inf"));
    }
  }
  return absl::OkStatus();
}

// The groups solved one after another within a block (true-sequential), or all at once.
std::vector<std::vector<LinearInput>> SolveGroups(bool true_sequential) {
  if (true_sequential) {
    return {{LinearInput::kQkv}, {LinearInput::kO}, {LinearInput::kGateUp}, {LinearInput::kDown}};
  }
  return {{LinearInput::kQkv, LinearInput::kO, LinearInput::kGateUp, LinearInput::kDown}};
}

Tensor I32Tensor(const std::vector<int32_t>& v) {
  Tensor t = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(v.size())});
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

std::vector<int32_t> I32Vector(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return std::vector<int32_t>(p, p + t.numel());
}

absl::Status InstallWeight(Model& model, int b, LinearKind k, const QuantizedLinear& q) {
  Linear& lin = model.block(b).at(k);
  if (lin.weight.dim(0) != q.d_out || lin.weight.dim(1) != q.d_in) {
    return absl::InvalidArgumentError(absl::StrCat(LinearPrefix(b, k), ": quantized shape [", q.d_out, ", ",
                                                   q.d_in, "] does not match the model"));
  }
  Tensor host = Tensor::FromVector(q.Dequantized(), {q.d_out, q.d_in});
  QCAL_ASSIGN_OR_RETURN(lin.weight, model.backend().ToDevice(host));
  return absl::OkStatus();
}

}  // namespace

QuantSpec SpecOf(const Recipe& recipe) {
  QuantSpec spec;
  spec.bits = recipe.weights.bits;
  spec.group_size = recipe.weights.group_size;
  spec.symmetric = recipe.weights.symmetric;
  spec.grid = recipe.weights.grid == "cuberoot" ? GridKind::kCuberoot : GridKind::kUniform;
  return spec;
}

absl::StatusOr<CalibActivations> EmbedCalibration(Model& model, const std::vector<std::vector<int>>& samples) {
  if (samples.empty()) return absl::InvalidArgumentError("no calibration samples");
  CalibActivations acts;
  acts.seq_len = static_cast<int>(samples[0].size());
  for (const auto& s : samples) {
    if (static_cast<int>(s.size()) != acts.seq_len) {
      return absl::InvalidArgumentError("calibration samples must have equal length");
    }
  }
  for (size_t c0 = 0; c0 < samples.size(); c0 += kCalibChunk) {
    const size_t c1 = std::min(samples.size(), c0 + kCalibChunk);
    std::vector<int> ids;
    for (size_t i = c0; i < c1; ++i) ids.insert(ids.end(), samples[i].begin(), samples[i].end());
    QCAL_ASSIGN_OR_RETURN(Tensor h, model.Embed(ids));
    acts.chunks.push_back(std::move(h));
    acts.chunk_batch.push_back(static_cast<int>(c1 - c0));
  }
  return acts;
}

absl::StatusOr<std::vector<LayerResult>> QuantizeBlock(Model& model, CalibActivations& acts,
                                                       const Recipe& recipe, StageTimes* times) {
  QCAL_RETURN_IF_ERROR(recipe.Validate());
  const int b = acts.next_block;
  if (b < 0 || b >= model.num_blocks()) {
    return absl::OutOfRangeError(absl::StrCat("block ", b, " is outside the model"));
  }
  StageTimes local;
  StageTimes& t = times ? *times : local;
  kernels::Backend& be = model.backend();
  const QuantSpec spec = SpecOf(recipe);
  GptqOptions gopt;
  gopt.damp = recipe.gptq.damp;
  gopt.block_size = recipe.gptq.block_size;
  gopt.act_order = recipe.gptq.act_order;
  BlockWeights& bw = model.block(b);
  std::vector<LayerResult> results;

  for (const auto& group : SolveGroups(recipe.gptq.true_sequential)) {
    // 1. Statistics: the Gram matrix of each input of the group, formed per chunk and summed in
    //    chunk order (so any split of chunks across workers gives the same sums).
    std::map<LinearInput, Tensor> grams;
    for (LinearInput in : group) {
      const int64_t width = bw.at(ConsumersOf(in)[0]).weight.dim(1);
      QCAL_ASSIGN_OR_RETURN(grams[in], be.Alloc(DType::kF32, {width, width}));
    }
    const LinearInput last = group.back();
    for (size_t c = 0; c < acts.chunks.size(); ++c) {
      Tensor hidden = acts.chunks[c];
      if (be.device() == Device::kHost) {
        hidden = acts.chunks[c].Clone();
      } else {
        QCAL_ASSIGN_OR_RETURN(hidden, be.Alloc(DType::kF32, acts.chunks[c].shape()));
        QCAL_RETURN_IF_ERROR(be.Copy(acts.chunks[c], hidden));
      }
      const auto t_fwd = Clock::now();
      double tap_seconds = 0;
      auto tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
        auto it = grams.find(in);
        if (it != grams.end()) {
          const auto t0 = Clock::now();
          QCAL_ASSIGN_OR_RETURN(Tensor partial, be.Alloc(DType::kF32, it->second.shape()));
          QCAL_RETURN_IF_ERROR(be.AccumulateGram(x, partial));
          QCAL_RETURN_IF_ERROR(be.Add(partial, it->second));
          tap_seconds += Since(t0);
        }
        // Stop the forward once the group's last input has been seen.
        if (in == last) return absl::CancelledError("statistics taken");
        return absl::OkStatus();
      };
      QCAL_RETURN_IF_ERROR(
          model.BlockForward(b, hidden, SeqShape{acts.chunk_batch[c], acts.seq_len, 0}, nullptr, tap));
      t.hessian += tap_seconds;
      t.forward += Since(t_fwd) - tap_seconds;
    }
    // 2. Solve every linear of the group and install its quantized weights.
    for (LinearInput in : group) {
      QCAL_ASSIGN_OR_RETURN(Tensor gram, be.ToHost(grams[in]));
      QCAL_RETURN_IF_ERROR(CheckFinite(gram, absl::StrCat("calibration statistics of block ", b)));
      for (LinearKind k : ConsumersOf(in)) {
        const auto t0 = Clock::now();
        const std::string name = LinearPrefix(b, k);
        QCAL_ASSIGN_OR_RETURN(Tensor w, be.ToHost(bw.at(k).weight));
        QCAL_RETURN_IF_ERROR(CheckFinite(w, absl::StrCat("weight ", name)));
        const int64_t d_out = w.dim(0), d_in = w.dim(1);
        LayerResult r;
        r.report.block = b;
        r.report.kind = k;
        r.report.name = name;
        r.report.d_out = d_out;
        r.report.d_in = d_in;
        QCAL_ASSIGN_OR_RETURN(QuantizedLinear rtn, QuantizeRtn<float>(w.data<float>(), d_out, d_in, spec));
        if (recipe.method == "gptq") {
          GptqStats stats;
          auto q = QuantizeGptq<float>(w.data<float>(), gram.data<float>(), d_out, d_in, spec, gopt, &stats);
          if (!q.ok()) return Annotate(q.status(), name);
          r.quantized = std::move(q).value();
          r.report.dead_columns = stats.dead_columns;
          r.report.damp_used = stats.damp_used;
        } else {
          r.quantized = rtn;
        }
        const std::vector<float> w_hat = r.quantized.Dequantized();
        const std::vector<float> w_rtn = rtn.Dequantized();
        const std::vector<float> zeros(static_cast<size_t>(d_out * d_in), 0.0f);
        const double norm = OutputError(w.data<float>(), zeros.data(), gram.data<float>(), d_out, d_in);
        const double denom = norm > 0 ? norm : 1.0;
        r.report.rel_error = OutputError(w.data<float>(), w_hat.data(), gram.data<float>(), d_out, d_in) / denom;
        r.report.rel_error_rtn =
            OutputError(w.data<float>(), w_rtn.data(), gram.data<float>(), d_out, d_in) / denom;
        QCAL_RETURN_IF_ERROR(InstallWeight(model, b, k, r.quantized));
        r.report.solve_seconds = Since(t0);
        t.solve += r.report.solve_seconds;
        results.push_back(std::move(r));
      }
    }
  }
  // 3. Push every chunk through the quantized block: the next block's inputs.
  const auto t_push = Clock::now();
  for (size_t c = 0; c < acts.chunks.size(); ++c) {
    QCAL_RETURN_IF_ERROR(model.BlockForward(b, acts.chunks[c], SeqShape{acts.chunk_batch[c], acts.seq_len, 0}));
  }
  t.forward += Since(t_push);
  acts.next_block = b + 1;
  return results;
}

absl::Status InstallBlock(Model& model, int b, const std::vector<QuantizedLinear>& linears) {
  if (b < 0 || b >= model.num_blocks() || linears.size() != kAllLinears.size()) {
    return absl::InvalidArgumentError(absl::StrCat("InstallBlock: block ", b, " with ", linears.size(), " linears"));
  }
  for (size_t i = 0; i < linears.size(); ++i) {
    QCAL_RETURN_IF_ERROR(InstallWeight(model, b, kAllLinears[i], linears[i]));
  }
  return absl::OkStatus();
}

absl::Status SaveActivations(kernels::Backend& backend, const CalibActivations& acts, const std::string& path) {
  std::map<std::string, Tensor> tensors;
  std::string batches;
  for (size_t c = 0; c < acts.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor host, backend.ToHost(acts.chunks[c]));
    tensors[absl::StrCat("chunk.", 100000 + c)] = host;
    absl::StrAppend(&batches, c ? "," : "", acts.chunk_batch[c]);
  }
  return WriteSafetensors(path, tensors,
                          {{"seq_len", absl::StrCat(acts.seq_len)},
                           {"next_block", absl::StrCat(acts.next_block)},
                           {"chunk_batch", batches}});
}

absl::StatusOr<CalibActivations> LoadActivations(kernels::Backend& backend, const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  CalibActivations acts;
  const auto& meta = file->metadata();
  auto get_int = [&](const char* key, int* out) -> absl::Status {
    auto it = meta.find(key);
    if (it == meta.end() || !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat(path, ": activation checkpoint lacks \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QCAL_RETURN_IF_ERROR(get_int("seq_len", &acts.seq_len));
  QCAL_RETURN_IF_ERROR(get_int("next_block", &acts.next_block));
  auto it = meta.find("chunk_batch");
  if (it == meta.end()) return absl::DataLossError(absl::StrCat(path, ": activation checkpoint lacks chunk_batch"));
  for (absl::string_view part : absl::StrSplit(it->second, ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v)) return absl::DataLossError(absl::StrCat(path, ": bad chunk_batch"));
    acts.chunk_batch.push_back(v);
  }
  if (acts.chunk_batch.size() != file->tensors().size()) {
    return absl::DataLossError(absl::StrCat(path, ": chunk count does not match chunk_batch"));
  }
  for (const auto& [name, info] : file->tensors()) {
    QCAL_ASSIGN_OR_RETURN(Tensor t, file->Get(name));
    if (t.dtype() != DType::kF32 || t.rank() != 2) return absl::DataLossError(absl::StrCat(path, ": bad chunk ", name));
    QCAL_ASSIGN_OR_RETURN(Tensor dev, backend.ToDevice(t));
    acts.chunks.push_back(std::move(dev));
  }
  return acts;
}

std::string SerializeQuantizedLinear(const QuantizedLinear& q) {
  std::map<std::string, Tensor> t;
  t["codes"] = I32Tensor(q.codes);
  t["zeros"] = I32Tensor(q.zeros);
  t["g_idx"] = I32Tensor(q.g_idx);
  t["perm"] = I32Tensor(q.perm);
  t["scales"] = Tensor::FromVector(q.scales, {static_cast<int64_t>(q.scales.size())});
  std::map<std::string, std::string> meta = {
      {"d_out", absl::StrCat(q.d_out)},
      {"d_in", absl::StrCat(q.d_in)},
      {"bits", absl::StrCat(q.spec.bits)},
      {"group_size", absl::StrCat(q.spec.group_size)},
      {"effective_group_size", absl::StrCat(q.group_size)},
      {"n_groups", absl::StrCat(q.n_groups)},
      {"symmetric", q.spec.symmetric ? "1" : "0"},
      {"grid", q.spec.grid == GridKind::kCuberoot ? "cuberoot" : "uniform"}};
  auto bytes = SerializeSafetensors(t, meta);
  QCAL_CHECK(bytes.ok());  // host tensors only: cannot fail
  return *std::move(bytes);
}

absl::StatusOr<QuantizedLinear> ParseQuantizedLinear(const std::string& bytes) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(bytes, "quantized linear artifact"));
  const auto& meta = file->metadata();
  auto get = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = meta.find(key);
    if (it == meta.end() || !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat("quantized linear artifact lacks \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QuantizedLinear q;
  int64_t bits = 0, gs = 0, sym = 0;
  QCAL_RETURN_IF_ERROR(get("d_out", &q.d_out));
  QCAL_RETURN_IF_ERROR(get("d_in", &q.d_in));
  QCAL_RETURN_IF_ERROR(get("bits", &bits));
  QCAL_RETURN_IF_ERROR(get("group_size", &gs));
  QCAL_RETURN_IF_ERROR(get("effective_group_size", &q.group_size));
  QCAL_RETURN_IF_ERROR(get("n_groups", &q.n_groups));
  QCAL_RETURN_IF_ERROR(get("symmetric", &sym));
  q.spec.bits = static_cast<int>(bits);
  q.spec.group_size = static_cast<int>(gs);
  q.spec.symmetric = sym != 0;
  auto grid = meta.find("grid");
  q.spec.grid = (grid != meta.end() && grid->second == "cuberoot") ? GridKind::kCuberoot : GridKind::kUniform;
  for (const char* name : {"codes", "zeros", "g_idx", "perm", "scales"}) {
    if (!file->Has(name)) return absl::DataLossError(absl::StrCat("quantized linear artifact lacks ", name));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor codes, file->Get("codes"));
  QCAL_ASSIGN_OR_RETURN(Tensor zeros, file->Get("zeros"));
  QCAL_ASSIGN_OR_RETURN(Tensor g_idx, file->Get("g_idx"));
  QCAL_ASSIGN_OR_RETURN(Tensor perm, file->Get("perm"));
  QCAL_ASSIGN_OR_RETURN(Tensor scales, file->Get("scales"));
  q.codes = I32Vector(codes);
  q.zeros = I32Vector(zeros);
  q.g_idx = I32Vector(g_idx);
  q.perm = I32Vector(perm);
  const float* sp = scales.data<float>();
  q.scales.assign(sp, sp + scales.numel());
  if (static_cast<int64_t>(q.codes.size()) != q.d_out * q.d_in ||
      static_cast<int64_t>(q.scales.size()) != q.n_groups * q.d_out ||
      static_cast<int64_t>(q.zeros.size()) != q.n_groups * q.d_out ||
      static_cast<int64_t>(q.g_idx.size()) != q.d_in) {
    return absl::DataLossError("quantized linear artifact has inconsistent sizes");
  }
  return q;
}

absl::StatusOr<QuantizeOutcome> QuantizeModel(Model& model, const std::vector<std::vector<int>>& samples,
                                              const Recipe& recipe, const BlockProgressFn& progress) {
  QCAL_ASSIGN_OR_RETURN(CalibActivations acts, EmbedCalibration(model, samples));
  QuantizeOutcome out;
  const int nb = model.num_blocks();
  for (int b = 0; b < nb; ++b) {
    QCAL_ASSIGN_OR_RETURN(std::vector<LayerResult> block, QuantizeBlock(model, acts, recipe, &out.times));
    for (LayerResult& r : block) {
      out.quantized[r.report.name] = std::move(r.quantized);
      out.layers.push_back(std::move(r.report));
    }
    if (progress) progress(b + 1, nb);
  }
  return out;
}

}  // namespace qcal::engine
