// oac_probe: measures why output-adaptive calibration (OAC) loses to GPTQ at 2 bits on stories260k
// (docs/QUALITY.md, "Output-adaptive calibration (OAC, issue 12)"). A measurement tool, not a test:
// it asserts nothing and prints its tables to stdout (progress to stderr).
//
// Settings: stories260k; calibration tinystories-calib.txt, 128 samples of 256, seed 0; evaluation
// tinystories-eval.txt, L = 256, all windows; W<bits> g<group> (default W2 g32), GPTQ defaults
// (`damp` 0.01 unless --damp); CPU, 2 threads, fp32. Each method quantizes a fresh model with
// QuantizeModel, as `qcal quantize` does; H_oac and H_tok are formed once more on the FP model.
//
// Subcommands:
//   objective  GPTQ (layer Hessian), OAC (H_oac) and per-token OAC (H_tok): their perplexities,
//              and per linear tr(ΔW·H_oac·ΔWᵀ) of each method's error ΔW, i.e. whether OAC's solve
//              lowers its own objective. The quick part: 81 s on 2 shared cores.
//   all        objective, then the perplexity of the FP model with a single linear, and with a
//              single block, replaced by each method's (about 120 evaluations; long).
//   curvature  Along the OAC error Δ of five linears: the calibration loss L(W + εΔ) for ε from
//              0.02 to 1, split into its odd (first-order) and even (second-order) parts, and
//              the second difference against ΔᵀH_oacΔ and ΔᵀH_tokΔ (60 calibration-set
//              evaluations; more than 5 minutes on 2 shared cores).
//
//   build/bin/oac_probe SUBCOMMAND [--bits N] [--group N] [--damp X] [SHARED_DIR]
//   tools/quality/oac_probe.sh SUBCOMMAND [...]   (builds the target first)
//
// SHARED_DIR (holding models/ and data/): the argument, else $QCAL_SHARED_DIR, else ../shared
// beside the source tree.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "kernels/backend.h"
#include "services/engine/evaluate.h"
#include "services/engine/gang/plan.h"
#include "services/engine/model.h"
#include "services/engine/oac/gradient_pass.h"
#include "services/engine/oac/oac_job.h"
#include "services/engine/quantize.h"
#include "services/engine/recipe.h"

namespace qcal::engine {
namespace {

constexpr int kSamples = 128;
constexpr int kSeqLen = 256;
constexpr uint64_t kSeed = 0;
constexpr int kThreads = 2;
constexpr const char* kLinearNames[kNumLinears] = {"q", "k", "v", "o", "gate", "up", "down"};
// The methods compared, in table order.
constexpr HessianKind kMethods[] = {HessianKind::kLayer, HessianKind::kOutputAdaptive,
                                    HessianKind::kOutputAdaptiveToken};
constexpr int kNumMethods = 3;

struct ProbeOptions {
  std::string shared_dir;  // holds models/stories260k and data/
  int bits = 2;            // Default: 2.
  int group_size = 32;     // Default: 32.
  double damp = 0.01;      // gptq.damp. Default: 0.01 (the recipe default).
};

using LinearId = std::pair<int, int>;  // (block, LinearKind as int)
using Matrices = std::map<LinearId, std::vector<float>>;

// What every measurement shares: the backend, the model's path and the token data.
struct Context {
  ProbeOptions options;
  std::string model_dir;
  std::unique_ptr<kernels::Backend> backend;
  std::vector<std::vector<int>> samples;  // calibration samples, BOS first
  TokenWindows eval;                      // the evaluation windows
  TokenWindows calib;                     // the calibration samples as windows (the OAC loss)
};

absl::StatusOr<std::vector<int>> Tokens(const Tokenizer& tokenizer, const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string text, LoadCorpusText(path));
  return TokenizeCorpus(tokenizer, text, path);
}

absl::StatusOr<Context> MakeContext(const ProbeOptions& options) {
  Context c;
  c.options = options;
  c.model_dir = options.shared_dir + "/models/stories260k";
  kernels::BackendOptions bo;
  bo.threads = kThreads;
  QCAL_ASSIGN_OR_RETURN(c.backend, kernels::CreateBackend(bo));
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(c.model_dir));
  const std::string calib_path = options.shared_dir + "/data/tinystories-calib.txt";
  QCAL_ASSIGN_OR_RETURN(std::vector<int> calib, Tokens(*tokenizer, calib_path));
  QCAL_ASSIGN_OR_RETURN(c.samples, SampleCalibration(calib, kSamples, kSeqLen, kSeed,
                                                     tokenizer->bos_id(), calib_path));
  const std::string eval_path = options.shared_dir + "/data/tinystories-eval.txt";
  QCAL_ASSIGN_OR_RETURN(std::vector<int> eval, Tokens(*tokenizer, eval_path));
  QCAL_ASSIGN_OR_RETURN(c.eval, MakeEvalWindows(eval, kSeqLen, -1, tokenizer->bos_id(), eval_path));
  // Sample s predicts s[1..] from s[..-1]: the loss the gradient pass differentiates.
  c.calib.seq_len = static_cast<int>(c.samples.front().size()) - 1;
  for (const std::vector<int>& s : c.samples) {
    c.calib.inputs.emplace_back(s.begin(), s.end() - 1);
    c.calib.targets.emplace_back(s.begin() + 1, s.end());
  }
  return c;
}

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const Context& c) {
  return Model::Load(c.model_dir, c.backend.get());
}

Matrices Snapshot(const Model& m) {
  Matrices w;
  for (int b = 0; b < m.num_blocks(); ++b) {
    for (LinearKind k : kAllLinears) {
      const Tensor& t = m.block(b).at(k).weight;
      w[{b, static_cast<int>(k)}] =
          std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
    }
  }
  return w;
}

// Puts `w`'s weights of linear `id` into `m`.
void SetLinear(Model& m, const Matrices& w, LinearId id) {
  const std::vector<float>& v = w.at(id);
  std::copy(v.begin(), v.end(),
            m.block(id.first).at(static_cast<LinearKind>(id.second)).weight.data<float>());
}

int64_t Rows(const Model& m, LinearId id) {
  return m.block(id.first).at(static_cast<LinearKind>(id.second)).weight.dim(0);
}

absl::StatusOr<double> Perplexity(Model& m, const Context& c) {
  QCAL_ASSIGN_OR_RETURN(PerplexityResult r, EvaluatePerplexity(m, c.eval));
  return r.perplexity;
}

// Σ NLL (nats) over the calibration samples' predictions.
absl::StatusOr<double> CalibLoss(Model& m, const Context& c) {
  QCAL_ASSIGN_OR_RETURN(PerplexityResult r, EvaluatePerplexity(m, c.calib));
  return r.nll * static_cast<double>(r.tokens);
}

struct Quantized {
  Matrices weights;  // the dequantized weights of every linear
  double perplexity = 0;
};

absl::StatusOr<Quantized> Quantize(const Context& c, HessianKind kind) {
  const ProbeOptions& o = c.options;
  const std::string text =
      absl::StrCat("method: gptq\nhessian: ", RecipeName(kind), "\nweights: {bits: ", o.bits,
                   ", group_size: ", o.group_size, "}\ngptq: {damp: ", o.damp, "}\n");
  QCAL_ASSIGN_OR_RETURN(Recipe recipe, ParseRecipeYaml(text, "oac_probe"));
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<Model> m, LoadModel(c));
  std::fprintf(stderr, "quantizing (hessian: %s)\n", RecipeName(kind));
  QCAL_RETURN_IF_ERROR(QuantizeModel(*m, c.samples, recipe).status());
  Quantized q;
  QCAL_ASSIGN_OR_RETURN(q.perplexity, Perplexity(*m, c));
  q.weights = Snapshot(*m);
  return q;
}

struct Hessians {
  Matrices h;          // [d_in, d_in] of every linear
  int64_t tokens = 0;  // predictions the pass summed over
};

// H_oac (kOutputAdaptive) or H_tok (kOutputAdaptiveToken) of every linear on the FP model.
absl::StatusOr<Hessians> OacHessians(const Context& c, HessianKind kind) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<Model> m, LoadModel(c));
  OacMemoryStore store;
  const ChunkRange all{0, NumChunks(static_cast<int>(c.samples.size()))};
  QCAL_ASSIGN_OR_RETURN(GradientChunks chunks, GradientChunksOf(c.samples, all));
  GradientPassOptions po;
  po.kind = kind;
  std::fprintf(stderr, "gradient pass (%s)\n", RecipeName(kind));
  QCAL_ASSIGN_OR_RETURN(GradientPassStats st,
                        RunGradientPass(*m, chunks, po, store.Sink(m->backend(), all.end)));
  Hessians out;
  out.tokens = st.tokens;
  const OacSource source = store.Source();
  for (int b = 0; b < m->num_blocks(); ++b) {
    for (LinearKind k : kAllLinears) {
      QCAL_ASSIGN_OR_RETURN(LinearOac s, source(b, k));
      const float* h = s.hessian.data<float>();
      out.h[{b, static_cast<int>(k)}] = std::vector<float>(h, h + s.hessian.numel());
    }
  }
  return out;
}

// tr(D·H·Dᵀ) for D [rows, n] and H [n, n].
double Quad(const std::vector<double>& d, const std::vector<float>& h) {
  const auto n = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(h.size()))));
  const int64_t rows = static_cast<int64_t>(d.size()) / n;
  double s = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const double* dr = d.data() + r * n;
    for (int64_t i = 0; i < n; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(h[i * n + j]) * dr[j];
      s += dr[i] * acc;
    }
  }
  return s;
}

// to - from of linear `id`, in double.
std::vector<double> Difference(const Matrices& to, const Matrices& from, LinearId id) {
  const std::vector<float>& a = to.at(id);
  const std::vector<float>& b = from.at(id);
  std::vector<double> d(a.size());
  for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<double>(a[i]) - b[i];
  return d;
}

std::vector<LinearId> AllLinears(const Model& m) {
  std::vector<LinearId> ids;
  for (int b = 0; b < m.num_blocks(); ++b) {
    for (LinearKind k : kAllLinears) ids.emplace_back(b, static_cast<int>(k));
  }
  return ids;
}

// objective (and, with `replacements`, all).
absl::Status RunObjective(const Context& c, bool replacements) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<Model> fp, LoadModel(c));
  const Matrices w_fp = Snapshot(*fp);
  QCAL_ASSIGN_OR_RETURN(const double ppl_fp, Perplexity(*fp, c));
  Quantized q[kNumMethods];
  for (int i = 0; i < kNumMethods; ++i) {
    QCAL_ASSIGN_OR_RETURN(q[i], Quantize(c, kMethods[i]));
  }
  QCAL_ASSIGN_OR_RETURN(const Hessians h, OacHessians(c, HessianKind::kOutputAdaptive));
  const double tokens = static_cast<double>(h.tokens);
  const ProbeOptions& o = c.options;
  std::printf("stories260k W%d g%d, damp %g, calibration %d x %d seed %llu\n\n", o.bits,
              o.group_size, o.damp, kSamples, kSeqLen, static_cast<unsigned long long>(kSeed));
  std::printf("| Perplexity | FP | GPTQ | OAC | OAC per-token |\n|---|---|---|---|---|\n");
  std::printf("| all linears | %.4f | %.4f | %.4f | %.4f |\n\n", ppl_fp, q[0].perplexity,
              q[1].perplexity, q[2].perplexity);

  std::printf(
      "J = tr(dW H_oac dWᵀ) of each method's error (H_oac on the FP model, %lld "
      "predictions); predicted dNLL/token = J / 2 / predictions\n\n",
      static_cast<long long>(h.tokens));
  std::printf(
      "| Block | Linear | d_out | J GPTQ | J OAC | J OAC per-token | pred GPTQ | pred OAC |\n"
      "|---|---|---|---|---|---|---|---|\n");
  const std::vector<LinearId> ids = AllLinears(*fp);
  double sum[kNumMethods] = {};
  int oac_lower = 0;
  for (const LinearId& id : ids) {
    double j[kNumMethods];
    for (int i = 0; i < kNumMethods; ++i) {
      j[i] = Quad(Difference(w_fp, q[i].weights, id), h.h.at(id));
      sum[i] += j[i];
    }
    oac_lower += j[1] < j[0];
    std::printf("| %d | %s | %lld | %.4g | %.4g | %.4g | %.4f | %.4f |\n", id.first,
                kLinearNames[id.second], static_cast<long long>(Rows(*fp, id)), j[0], j[1], j[2],
                0.5 * j[0] / tokens, 0.5 * j[1] / tokens);
  }
  std::printf(
      "\nsum J: GPTQ %.4g, OAC %.4g, OAC per-token %.4g; predicted dNLL/token GPTQ %.4f, "
      "OAC %.4f\n",
      sum[0], sum[1], sum[2], 0.5 * sum[0] / tokens, 0.5 * sum[1] / tokens);
  std::printf("actual dNLL/token (evaluation): GPTQ %.4f, OAC %.4f\n",
              std::log(q[0].perplexity / ppl_fp), std::log(q[1].perplexity / ppl_fp));
  std::printf("OAC's J below GPTQ's in %d/%zu linears\n\n", oac_lower, ids.size());
  if (!replacements) return absl::OkStatus();

  std::fprintf(stderr, "single-linear replacements (%zu x %d evaluations)\n", ids.size(),
               kNumMethods);
  std::printf("Perplexity of the FP model with one linear replaced by each method's\n\n");
  std::printf("| Block | Linear | GPTQ | OAC | OAC per-token |\n|---|---|---|---|---|\n");
  int oac_better = 0;
  for (const LinearId& id : ids) {
    double p[kNumMethods];
    for (int i = 0; i < kNumMethods; ++i) {
      SetLinear(*fp, q[i].weights, id);
      QCAL_ASSIGN_OR_RETURN(p[i], Perplexity(*fp, c));
      SetLinear(*fp, w_fp, id);
    }
    oac_better += p[1] < p[0];
    std::printf("| %d | %s | %.4f | %.4f | %.4f |\n", id.first, kLinearNames[id.second], p[0], p[1],
                p[2]);
  }
  std::printf("\nOAC's linear alone better than GPTQ's in %d/%zu linears\n\n", oac_better,
              ids.size());

  std::fprintf(stderr, "single-block replacements\n");
  std::printf("Perplexity of the FP model with one block's linears replaced by each method's\n\n");
  std::printf("| Block | GPTQ | OAC | OAC per-token |\n|---|---|---|---|\n");
  for (int b = 0; b < fp->num_blocks(); ++b) {
    double p[kNumMethods];
    for (int i = 0; i < kNumMethods; ++i) {
      for (LinearKind k : kAllLinears) SetLinear(*fp, q[i].weights, {b, static_cast<int>(k)});
      QCAL_ASSIGN_OR_RETURN(p[i], Perplexity(*fp, c));
      for (LinearKind k : kAllLinears) SetLinear(*fp, w_fp, {b, static_cast<int>(k)});
    }
    std::printf("| %d | %.4f | %.4f | %.4f |\n", b, p[0], p[1], p[2]);
  }
  return absl::OkStatus();
}

absl::Status RunCurvature(const Context& c) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<Model> fp, LoadModel(c));
  const Matrices w_fp = Snapshot(*fp);
  QCAL_ASSIGN_OR_RETURN(const Quantized oac, Quantize(c, HessianKind::kOutputAdaptive));
  QCAL_ASSIGN_OR_RETURN(const Hessians h_oac, OacHessians(c, HessianKind::kOutputAdaptive));
  QCAL_ASSIGN_OR_RETURN(const Hessians h_tok, OacHessians(c, HessianKind::kOutputAdaptiveToken));
  QCAL_ASSIGN_OR_RETURN(const double l0, CalibLoss(*fp, c));
  const ProbeOptions& o = c.options;
  std::printf(
      "stories260k W%d g%d, damp %g; Δ = W_oac - W_fp of the linear; L = Σ NLL over the "
      "calibration set (L0 = %.4f)\n",
      o.bits, o.group_size, o.damp, l0);
  std::printf(
      "odd = (L(+ε) - L(-ε)) / 2 (the first-order term and odd higher ones); even = (L(+ε) + "
      "L(-ε) - 2·L0) / 2; curvature = 2·even / ε²\n\n");
  const LinearId probed[] = {{0, static_cast<int>(LinearKind::kGate)},
                             {0, static_cast<int>(LinearKind::kV)},
                             {2, static_cast<int>(LinearKind::kDown)},
                             {4, static_cast<int>(LinearKind::kV)},
                             {1, static_cast<int>(LinearKind::kK)}};
  for (const LinearId& id : probed) {
    const std::vector<double> d = Difference(oac.weights, w_fp, id);
    const double q_oac = Quad(d, h_oac.h.at(id));
    const double q_tok = Quad(d, h_tok.h.at(id));
    const auto d_out = static_cast<double>(Rows(*fp, id));
    std::printf("block %d %s (d_out %.0f): ΔᵀH_oacΔ %.4g, ΔᵀH_tokΔ %.4g\n\n", id.first,
                kLinearNames[id.second], d_out, q_oac, q_tok);
    std::printf(
        "| ε | L(+ε) - L0 | L(-ε) - L0 | odd | even | curvature | H_oac / curv | "
        "H_oac / curv / d_out | H_tok / curv |\n|---|---|---|---|---|---|---|---|---|\n");
    float* w = fp->block(id.first).at(static_cast<LinearKind>(id.second)).weight.data<float>();
    const std::vector<float>& wf = w_fp.at(id);
    for (const double eps : {0.02, 0.05, 0.1, 0.25, 0.5, 1.0}) {
      double l[2];
      for (int side = 0; side < 2; ++side) {
        const double e = side == 0 ? eps : -eps;
        for (size_t i = 0; i < d.size(); ++i) w[i] = static_cast<float>(wf[i] + e * d[i]);
        QCAL_ASSIGN_OR_RETURN(l[side], CalibLoss(*fp, c));
      }
      SetLinear(*fp, w_fp, id);
      const double curv = (l[0] + l[1] - 2 * l0) / (eps * eps);
      std::printf("| %.2f | %.4f | %.4f | %.4f | %.4f | %.4g | %.3g | %.3g | %.3g |\n", eps,
                  l[0] - l0, l[1] - l0, 0.5 * (l[0] - l[1]), 0.5 * (l[0] + l[1] - 2 * l0), curv,
                  q_oac / curv, q_oac / curv / d_out, q_tok / curv);
    }
    std::printf("\n");
  }
  return absl::OkStatus();
}

int Usage() {
  std::fprintf(stderr,
               "usage: oac_probe objective|all|curvature [--bits N] [--group N] [--damp X] "
               "[SHARED_DIR]\n");
  return 2;
}

int Main(int argc, char** argv) {
  if (argc < 2) return Usage();
  const std::string command = argv[1];
  if (command != "objective" && command != "all" && command != "curvature") return Usage();
  ProbeOptions o;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--bits" || arg == "--group" || arg == "--damp") {
      if (i + 1 == argc) return Usage();
      const char* value = argv[++i];
      const bool ok = arg == "--bits"    ? absl::SimpleAtoi(value, &o.bits)
                      : arg == "--group" ? absl::SimpleAtoi(value, &o.group_size)
                                         : absl::SimpleAtod(value, &o.damp);
      if (!ok) {
        std::fprintf(stderr, "oac_probe: %s: not a number: %s\n", arg.c_str(), value);
        return 2;
      }
    } else if (!arg.empty() && arg[0] == '-') {
      return Usage();
    } else {
      o.shared_dir = arg;
    }
  }
  if (o.shared_dir.empty()) {
    const char* env = std::getenv("QCAL_SHARED_DIR");
    o.shared_dir = env != nullptr
                       ? std::string(env)
                       : (std::filesystem::path(QCAL_SOURCE_DIR).parent_path() / "shared").string();
  }
  absl::StatusOr<Context> c = MakeContext(o);
  absl::Status st = c.status();
  if (st.ok()) st = command == "curvature" ? RunCurvature(*c) : RunObjective(*c, command == "all");
  if (!st.ok()) {
    std::fprintf(stderr, "oac_probe %s: %s\n", command.c_str(), st.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace qcal::engine

int main(int argc, char** argv) { return qcal::engine::Main(argc, argv); }
