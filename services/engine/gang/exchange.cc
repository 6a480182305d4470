#include "services/engine/gang/exchange.h"

#include <cstring>
#include <map>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "services/engine/driver/artifacts.h"
#include "services/engine/pipeline.h"

namespace qcal::engine {
namespace {

constexpr char kInputMagic[4] = {'Q', 'G', 'I', 'S'};
constexpr char kStatsMagic[4] = {'Q', 'G', 'A', 'S'};
constexpr char kLayerMagic[4] = {'Q', 'G', 'L', 'Y'};
constexpr char kOacMagic[4] = {'Q', 'G', 'O', 'A'};
// magic, linear, node count, Fisher flag, d_out, d_in.
constexpr int64_t kOacHeaderBytes = 4 + 4 + 4 + 4 + 8 + 8;
// magic, input, node count, abs statistics flag, width.
constexpr int64_t kInputHeaderBytes = 4 + 4 + 4 + 4 + 8;
// magic, node count, width.
constexpr int64_t kStatsHeaderBytes = 4 + 4 + 8;
// level, index.
constexpr int64_t kNodeBytes = 4 + 4;

int64_t AbsStatsBytes(int64_t width) { return 8 + 8 + width * (4 + 8); }

class Writer {
 public:
  explicit Writer(int64_t size) { out_.reserve(static_cast<size_t>(size)); }
  template <typename T>
  void Put(T v) {
    out_.append(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  void PutBytes(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  Reader(const std::string& in, const char* what) : in_(in), what_(what) {}
  template <typename T>
  absl::StatusOr<T> Get() {
    T v{};
    QCAL_RETURN_IF_ERROR(GetBytes(&v, sizeof(v)));
    return v;
  }
  absl::Status GetBytes(void* p, size_t n) {
    if (in_.size() - pos_ < n) return absl::DataLossError(absl::StrCat(what_, ": truncated"));
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  absl::Status Magic(const char (&magic)[4]) {
    char m[4];
    QCAL_RETURN_IF_ERROR(GetBytes(m, 4));
    if (std::memcmp(m, magic, 4) != 0) {
      return absl::DataLossError(absl::StrCat(what_, ": not this kind of payload"));
    }
    return absl::OkStatus();
  }
  absl::Status End() const {
    if (pos_ != in_.size()) {
      return absl::DataLossError(absl::StrCat(what_, ": ", in_.size() - pos_, " trailing bytes"));
    }
    return absl::OkStatus();
  }
  size_t pos() const { return pos_; }

 private:
  const std::string& in_;
  const char* what_;
  size_t pos_ = 0;
};

void PutAbsStats(Writer& w, const ActivationStats& s) {
  w.Put<int64_t>(s.tokens());
  w.Put<int64_t>(s.skipped());
  w.PutBytes(s.max_abs().data(), s.max_abs().size() * sizeof(float));
  w.PutBytes(s.sum_abs().data(), s.sum_abs().size() * sizeof(double));
}

// Adding totals to empty statistics is exact (max(0, a) = a for a >= 0, 0.0 + s = s): the bits
// sent are the bits received.
absl::StatusOr<ActivationStats> GetAbsStats(Reader& r, int64_t width) {
  QCAL_ASSIGN_OR_RETURN(const int64_t tokens, r.Get<int64_t>());
  QCAL_ASSIGN_OR_RETURN(const int64_t skipped, r.Get<int64_t>());
  std::vector<float> max_abs(static_cast<size_t>(width));
  std::vector<double> sum_abs(static_cast<size_t>(width));
  QCAL_RETURN_IF_ERROR(r.GetBytes(max_abs.data(), max_abs.size() * sizeof(float)));
  QCAL_RETURN_IF_ERROR(r.GetBytes(sum_abs.data(), sum_abs.size() * sizeof(double)));
  ActivationStats s(width);
  QCAL_RETURN_IF_ERROR(s.AddTotals(max_abs, sum_abs, tokens, skipped));
  return s;
}

absl::StatusOr<TreeNode> GetNode(Reader& r) {
  TreeNode n;
  QCAL_ASSIGN_OR_RETURN(n.level, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(n.index, r.Get<int32_t>());
  return n;
}

// Node counts and widths read from the wire are bounded by what the remaining bytes can hold
// before anything is allocated.
absl::Status CheckCount(int64_t count, int64_t node_bytes, size_t remaining, const char* what) {
  if (count < 0 || (node_bytes > 0 && count > static_cast<int64_t>(remaining) / node_bytes)) {
    return absl::DataLossError(absl::StrCat(what, ": ", count, " nodes do not fit the payload"));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t InputPartialsBytes(int64_t nodes, int64_t width, bool abs_stats) {
  return kInputHeaderBytes +
         nodes * (kNodeBytes + width * width * 4 + (abs_stats ? AbsStatsBytes(width) : 0));
}

int64_t ActivationStatsPartialsBytes(int64_t nodes, int64_t width) {
  return kStatsHeaderBytes + nodes * (kNodeBytes + AbsStatsBytes(width));
}

absl::StatusOr<std::string> SerializeInputPartials(kernels::Backend& backend, LinearInput input,
                                                   int64_t width, const InputPartials& partials) {
  const bool abs = !partials.empty() && partials[0].value.abs_stats.has_value();
  for (const auto& p : partials) {
    if (p.value.input != input || p.value.gram.shape() != Shape{width, width} ||
        p.value.abs_stats.has_value() != abs || (abs && p.value.abs_stats->width() != width)) {
      return absl::InvalidArgumentError(
          absl::StrCat("partial statistics of input ", LinearInputName(p.value.input),
                       " do not fit input ", LinearInputName(input), " of width ", width));
    }
  }
  const int64_t n = static_cast<int64_t>(partials.size());
  Writer w(InputPartialsBytes(n, width, abs));
  w.PutBytes(kInputMagic, 4);
  w.Put<int32_t>(static_cast<int32_t>(input));
  w.Put<int32_t>(static_cast<int32_t>(n));
  w.Put<int32_t>(abs ? 1 : 0);
  w.Put<int64_t>(width);
  for (const auto& p : partials) {
    w.Put<int32_t>(p.node.level);
    w.Put<int32_t>(p.node.index);
    // A partial holds its lower triangle (Backend::GramLower): send it mirrored, every byte set.
    Tensor gram = p.value.gram;
    QCAL_RETURN_IF_ERROR(backend.MirrorLower(gram));
    QCAL_ASSIGN_OR_RETURN(Tensor host, backend.ToHost(gram));
    w.PutBytes(host.raw(), host.nbytes());
    if (abs) PutAbsStats(w, *p.value.abs_stats);
  }
  return w.Take();
}

absl::StatusOr<InputPartials> ParseInputPartials(kernels::Backend& backend, LinearInput input,
                                                 int64_t width, const std::string& bytes) {
  Reader r(bytes, "partial statistics");
  QCAL_RETURN_IF_ERROR(r.Magic(kInputMagic));
  QCAL_ASSIGN_OR_RETURN(const int32_t got_input, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(const int32_t count, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(const int32_t abs, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(const int64_t got_width, r.Get<int64_t>());
  if (got_input != static_cast<int32_t>(input) || got_width != width || (abs != 0 && abs != 1)) {
    return absl::DataLossError(absl::StrCat("partial statistics of input ", got_input, " (width ",
                                            got_width, ") where input ", LinearInputName(input),
                                            " of width ", width, " was expected"));
  }
  QCAL_RETURN_IF_ERROR(CheckCount(count, InputPartialsBytes(1, width, abs) - kInputHeaderBytes,
                                  bytes.size() - r.pos(), "partial statistics"));
  InputPartials out;
  for (int32_t i = 0; i < count; ++i) {
    TreePartial<InputStatistics> p;
    QCAL_ASSIGN_OR_RETURN(p.node, GetNode(r));
    p.value.input = input;
    Tensor host = Tensor::Zeros(DType::kF32, {width, width});
    QCAL_RETURN_IF_ERROR(r.GetBytes(host.raw(), host.nbytes()));
    QCAL_ASSIGN_OR_RETURN(p.value.gram, backend.ToDevice(host));
    if (abs) {
      QCAL_ASSIGN_OR_RETURN(ActivationStats s, GetAbsStats(r, width));
      p.value.abs_stats = std::move(s);
    }
    out.push_back(std::move(p));
  }
  QCAL_RETURN_IF_ERROR(r.End());
  return out;
}

int64_t OacPartialsBytes(int64_t nodes, int64_t d_out, int64_t d_in, bool fisher) {
  return kOacHeaderBytes +
         nodes * (kNodeBytes + d_in * (d_in + 1) / 2 * 4 + (fisher ? d_out * d_in * 4 : 0));
}

absl::StatusOr<std::string> SerializeOacPartials(kernels::Backend& backend, LinearKind kind,
                                                 int64_t d_out, int64_t d_in, bool fisher,
                                                 const TreePartials<LinearOac>& partials) {
  for (const auto& p : partials) {
    if (p.value.hessian.shape() != Shape{d_in, d_in} || p.value.fisher.defined() != fisher ||
        (fisher && p.value.fisher.shape() != Shape{d_out, d_in})) {
      return absl::InvalidArgumentError(absl::StrCat(
          "output-adaptive statistics of Hessian shape ", ShapeString(p.value.hessian.shape()),
          " do not fit linear ", LinearName(kind), " (", d_out, "x", d_in,
          fisher ? ", with a Fisher)" : ")"));
    }
  }
  const int64_t n = static_cast<int64_t>(partials.size());
  Writer w(OacPartialsBytes(n, d_out, d_in, fisher));
  w.PutBytes(kOacMagic, 4);
  w.Put<int32_t>(static_cast<int32_t>(kind));
  w.Put<int32_t>(static_cast<int32_t>(n));
  w.Put<int32_t>(fisher ? 1 : 0);
  w.Put<int64_t>(d_out);
  w.Put<int64_t>(d_in);
  for (const auto& p : partials) {
    w.Put<int32_t>(p.node.level);
    w.Put<int32_t>(p.node.index);
    QCAL_ASSIGN_OR_RETURN(Tensor h, backend.ToHost(p.value.hessian));
    const float* hp = h.data<float>();
    for (int64_t i = 0; i < d_in; ++i) w.PutBytes(hp + i * d_in + i, (d_in - i) * sizeof(float));
    if (fisher) {
      QCAL_ASSIGN_OR_RETURN(Tensor f, backend.ToHost(p.value.fisher));
      w.PutBytes(f.raw(), f.nbytes());
    }
  }
  return w.Take();
}

absl::StatusOr<TreePartials<LinearOac>> ParseOacPartials(kernels::Backend& backend, LinearKind kind,
                                                         int64_t d_out, int64_t d_in, bool fisher,
                                                         const std::string& bytes) {
  Reader r(bytes, "partial output-adaptive statistics");
  QCAL_RETURN_IF_ERROR(r.Magic(kOacMagic));
  QCAL_ASSIGN_OR_RETURN(const int32_t got_kind, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(const int32_t count, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(const int32_t got_fisher, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(const int64_t got_out, r.Get<int64_t>());
  QCAL_ASSIGN_OR_RETURN(const int64_t got_in, r.Get<int64_t>());
  if (got_kind != static_cast<int32_t>(kind) || got_out != d_out || got_in != d_in ||
      got_fisher != (fisher ? 1 : 0)) {
    return absl::DataLossError(
        absl::StrCat("partial output-adaptive statistics of linear ", got_kind, " (", got_out, "x",
                     got_in, ", Fisher flag ", got_fisher, ") where ", LinearName(kind), " (",
                     d_out, "x", d_in, fisher ? ", with a Fisher)" : ")", " was expected"));
  }
  QCAL_RETURN_IF_ERROR(CheckCount(count, OacPartialsBytes(1, d_out, d_in, fisher) - kOacHeaderBytes,
                                  bytes.size() - r.pos(), "partial output-adaptive statistics"));
  TreePartials<LinearOac> out;
  for (int32_t c = 0; c < count; ++c) {
    TreePartial<LinearOac> p;
    QCAL_ASSIGN_OR_RETURN(p.node, GetNode(r));
    Tensor h = Tensor::Zeros(DType::kF32, {d_in, d_in});
    float* hp = h.data<float>();
    for (int64_t i = 0; i < d_in; ++i) {
      QCAL_RETURN_IF_ERROR(r.GetBytes(hp + i * d_in + i, (d_in - i) * sizeof(float)));
      for (int64_t j = i + 1; j < d_in; ++j) hp[j * d_in + i] = hp[i * d_in + j];
    }
    QCAL_ASSIGN_OR_RETURN(p.value.hessian, backend.ToDevice(h));
    if (fisher) {
      Tensor f = Tensor::Zeros(DType::kF32, {d_out, d_in});
      QCAL_RETURN_IF_ERROR(r.GetBytes(f.raw(), f.nbytes()));
      QCAL_ASSIGN_OR_RETURN(p.value.fisher, backend.ToDevice(f));
    }
    out.push_back(std::move(p));
  }
  QCAL_RETURN_IF_ERROR(r.End());
  return out;
}

absl::StatusOr<std::string> SerializeActivationStatsPartials(
    int64_t width, const TreePartials<ActivationStats>& partials) {
  for (const auto& p : partials) {
    if (p.value.width() != width) {
      return absl::InvalidArgumentError(absl::StrCat(
          "activation statistics of width ", p.value.width(), " where ", width, " was expected"));
    }
  }
  const int64_t n = static_cast<int64_t>(partials.size());
  Writer w(ActivationStatsPartialsBytes(n, width));
  w.PutBytes(kStatsMagic, 4);
  w.Put<int32_t>(static_cast<int32_t>(n));
  w.Put<int64_t>(width);
  for (const auto& p : partials) {
    w.Put<int32_t>(p.node.level);
    w.Put<int32_t>(p.node.index);
    PutAbsStats(w, p.value);
  }
  return w.Take();
}

absl::StatusOr<TreePartials<ActivationStats>> ParseActivationStatsPartials(
    int64_t width, const std::string& bytes) {
  Reader r(bytes, "partial activation statistics");
  QCAL_RETURN_IF_ERROR(r.Magic(kStatsMagic));
  QCAL_ASSIGN_OR_RETURN(const int32_t count, r.Get<int32_t>());
  QCAL_ASSIGN_OR_RETURN(const int64_t got_width, r.Get<int64_t>());
  if (got_width != width) {
    return absl::DataLossError(absl::StrCat("activation statistics of width ", got_width, " where ",
                                            width, " was expected"));
  }
  QCAL_RETURN_IF_ERROR(CheckCount(count, kNodeBytes + AbsStatsBytes(width), bytes.size() - r.pos(),
                                  "partial activation statistics"));
  TreePartials<ActivationStats> out;
  for (int32_t i = 0; i < count; ++i) {
    QCAL_ASSIGN_OR_RETURN(const TreeNode node, GetNode(r));
    QCAL_ASSIGN_OR_RETURN(ActivationStats s, GetAbsStats(r, width));
    out.push_back({node, std::move(s)});
  }
  QCAL_RETURN_IF_ERROR(r.End());
  return out;
}

namespace {

// Two named F32 tensors of one shape as a safetensors byte string (host copies of `a` and `b`;
// `b` may be undefined).
absl::StatusOr<std::string> SerializePair(kernels::Backend* backend, const char* name_a,
                                          const Tensor& a, const char* name_b, const Tensor& b) {
  std::map<std::string, Tensor> t;
  for (auto [name, x] : {std::pair{name_a, &a}, std::pair{name_b, &b}}) {
    if (!x->defined()) continue;
    if (x->dtype() != DType::kF32 || x->shape() != a.shape() || x->rank() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("retraining exchange: ", name, " is ",
                                                     x->DebugString(), ", expected F32 ",
                                                     ShapeString(a.shape())));
    }
    Tensor host = *x;
    if (host.device() != Device::kHost) {
      QCAL_ASSIGN_OR_RETURN(host, backend->ToHost(host));
    }
    t[name] = host;
  }
  return SerializeSafetensors(t, {});
}

absl::Status ParsePair(const std::string& bytes, const char* what, const Shape& shape,
                       const char* name_a, Tensor* a, const char* name_b, Tensor* b,
                       bool b_required) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(bytes, what));
  for (auto [name, out, required] :
       {std::tuple{name_a, a, true}, std::tuple{name_b, b, b_required}}) {
    if (!file->Has(name)) {
      if (required) return absl::DataLossError(absl::StrCat(what, ": no ", name));
      *out = Tensor();
      continue;
    }
    QCAL_ASSIGN_OR_RETURN(Tensor t, file->Get(name));
    if (t.dtype() != DType::kF32 || t.shape() != shape) {
      return absl::DataLossError(absl::StrCat(what, ": ", name, " is ", t.DebugString(),
                                              ", expected F32 ", ShapeString(shape)));
    }
    *out = t.Clone();
  }
  if (file->tensors().size() != (b->defined() ? 2u : 1u)) {
    return absl::DataLossError(absl::StrCat(what, ": unexpected tensors"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> SerializeRetrainBase(const Tensor& base, const Tensor& fisher) {
  return SerializePair(nullptr, "base", base, "fisher", fisher);
}

absl::Status ParseRetrainBase(const std::string& bytes, int64_t d_out, int64_t d_in, Tensor* base,
                              Tensor* fisher) {
  return ParsePair(bytes, "retraining base", {d_out, d_in}, "base", base, "fisher", fisher,
                   /*b_required=*/false);
}

absl::StatusOr<std::string> SerializeRetrainSamples(kernels::Backend& backend, const Tensor& inputs,
                                                    const Tensor& targets) {
  if (!targets.defined()) return absl::InvalidArgumentError("retraining samples: no targets");
  return SerializePair(&backend, "inputs", inputs, "targets", targets);
}

absl::Status ParseRetrainSamples(kernels::Backend& backend, const std::string& bytes, int64_t rows,
                                 int64_t hidden, Tensor* inputs, Tensor* targets) {
  QCAL_RETURN_IF_ERROR(ParsePair(bytes, "retraining samples", {rows, hidden}, "inputs", inputs,
                                 "targets", targets, /*b_required=*/true));
  QCAL_ASSIGN_OR_RETURN(*inputs, backend.ToDevice(*inputs));
  QCAL_ASSIGN_OR_RETURN(*targets, backend.ToDevice(*targets));
  return absl::OkStatus();
}

std::string SerializeSolvedLayer(const LayerResult& result) {
  const std::string artifact = SerializeLayerArtifact(result);
  const std::string report = LayerReportJson(result.report).dump();
  Writer w(static_cast<int64_t>(4 + 8 + artifact.size() + report.size()));
  w.PutBytes(kLayerMagic, 4);
  w.Put<uint64_t>(artifact.size());
  w.PutBytes(artifact.data(), artifact.size());
  w.PutBytes(report.data(), report.size());
  return w.Take();
}

absl::StatusOr<LayerResult> ParseSolvedLayer(const std::string& bytes) {
  Reader r(bytes, "solved layer");
  QCAL_RETURN_IF_ERROR(r.Magic(kLayerMagic));
  QCAL_ASSIGN_OR_RETURN(const uint64_t n, r.Get<uint64_t>());
  if (n > bytes.size() - r.pos()) return absl::DataLossError("solved layer: truncated");
  std::string artifact(static_cast<size_t>(n), '\0');
  QCAL_RETURN_IF_ERROR(r.GetBytes(artifact.data(), artifact.size()));
  QCAL_ASSIGN_OR_RETURN(LayerResult out, ParseLayerArtifact(artifact));
  const nlohmann::json j =
      nlohmann::json::parse(bytes.substr(r.pos()), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::DataLossError("solved layer: malformed report");
  const int64_t artifact_rank = out.report.rank;
  QCAL_ASSIGN_OR_RETURN(out.report, LayerReportFromJson(j));
  if (out.report.rank != artifact_rank) {
    return absl::DataLossError(absl::StrCat("solved layer: the report's rank ", out.report.rank,
                                            " is not the artifact's rank ", artifact_rank));
  }
  return out;
}

std::vector<int64_t> ExchangeBytesPerBlock(const GangPlan& plan, const ModelConfig& config,
                                           const Recipe& recipe,
                                           const std::array<int64_t, kNumLinears>& layer_bytes) {
  const int world = plan.world;
  std::vector<int64_t> sent(static_cast<size_t>(world), 0);
  std::vector<int64_t> cover(static_cast<size_t>(world), 0);
  for (int r = 0; r < world; ++r) {
    const ChunkRange& c = plan.chunks[static_cast<size_t>(r)];
    cover[static_cast<size_t>(r)] =
        static_cast<int64_t>(AlignedCover(c.begin, c.end, plan.total_chunks).size());
  }
  const bool abs = recipe.error_reconstruction.enabled &&
                   recipe.error_reconstruction.whitening == Whitening::kDiagonal;
  for (LinearInput in : kAllLinearInputs) {
    const int64_t width = LinearShape(config, ConsumersOf(in)[0]).second;
    const int owner = plan.StatOwner(in);
    const int64_t consumers = static_cast<int64_t>(plan.ConsumerOwners(in).size());
    for (int r = 0; r < world; ++r) {
      if (r == owner) continue;
      const int64_t nodes = cover[static_cast<size_t>(r)];
      if (recipe.smoothing.enabled()) {
        sent[static_cast<size_t>(r)] += ActivationStatsPartialsBytes(nodes, width);
      }
      sent[static_cast<size_t>(r)] += InputPartialsBytes(nodes, width, abs);
    }
    if (recipe.smoothing.enabled()) {
      sent[static_cast<size_t>(owner)] += (world - 1) * ActivationStatsPartialsBytes(1, width);
    }
    sent[static_cast<size_t>(owner)] += (consumers - 1) * InputPartialsBytes(1, width, abs);
  }
  for (LinearKind k : kAllLinears) {
    sent[static_cast<size_t>(plan.OwnerOf(k))] += (world - 1) * layer_bytes[static_cast<size_t>(k)];
  }
  return sent;
}

}  // namespace qcal::engine
