#include "services/engine/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/model.h"

namespace qcal::engine {

namespace {

bool IsMixtral(const ModelConfig& config) { return config.model_type == "mixtral"; }

}  // namespace

std::string RouterWeightName(const ModelConfig& config, int block) {
  return absl::StrCat("model.layers.", block, IsMixtral(config) ? ".block_sparse_moe" : ".mlp",
                      ".gate.weight");
}

std::string ExpertLinearPrefix(const ModelConfig& config, int block, int expert, LinearKind kind) {
  QCAL_CHECK(kind == LinearKind::kGate || kind == LinearKind::kUp || kind == LinearKind::kDown);
  if (IsMixtral(config)) {
    // MixtralBlockSparseTop2MLP: w2(silu(w1(x)) * w3(x)).
    const char* name = kind == LinearKind::kGate ? "w1" : kind == LinearKind::kUp ? "w3" : "w2";
    return absl::StrCat("model.layers.", block, ".block_sparse_moe.experts.", expert, ".", name);
  }
  return absl::StrCat("model.layers.", block, ".mlp.experts.", expert, ".", LinearName(kind));
}

std::string SharedExpertPrefix(int block, LinearKind kind) {
  return absl::StrCat("model.layers.", block, ".mlp.shared_expert.", LinearName(kind));
}

std::string SharedExpertGateWeightName(int block) {
  return absl::StrCat("model.layers.", block, ".mlp.shared_expert_gate.weight");
}

void Routing::RowsOf(int e, std::vector<int32_t>* rows_out, std::vector<float>* weights_out) const {
  rows_out->clear();
  weights_out->clear();
  for (int64_t r = 0; r < rows; ++r) {
    for (int s = 0; s < top_k; ++s) {
      if (expert(r, s) == e) {
        rows_out->push_back(static_cast<int32_t>(r));
        weights_out->push_back(weight(r, s));
      }
    }
  }
}

Routing RouteTokens(const float* logits, int64_t rows, int num_experts, int top_k,
                    bool renormalize) {
  QCAL_CHECK(top_k >= 1 && top_k <= num_experts);
  Routing r;
  r.rows = rows;
  r.top_k = top_k;
  r.experts.resize(rows * top_k);
  r.weights.resize(rows * top_k);
  std::vector<float> p(num_experts);
  std::vector<int> order(num_experts);
  std::vector<double> e(num_experts);
  for (int64_t t = 0; t < rows; ++t) {
    const float* l = logits + t * num_experts;
    // Softmax in fp32: the exponentials and their sum in double, each probability rounded once.
    const float mx = *std::max_element(l, l + num_experts);
    double sum = 0;
    for (int i = 0; i < num_experts; ++i) sum += e[i] = std::exp(double(l[i]) - double(mx));
    for (int i = 0; i < num_experts; ++i) p[i] = static_cast<float>(e[i] / sum);
    // Top k of the fp32 probabilities; a stable sort keeps equal values in index order.
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    float kept = 0;
    for (int s = 0; s < top_k; ++s) kept += p[order[s]];
    for (int s = 0; s < top_k; ++s) {
      r.experts[t * top_k + s] = order[s];
      r.weights[t * top_k + s] = renormalize ? p[order[s]] / kept : p[order[s]];
    }
  }
  return r;
}

}  // namespace qcal::engine
