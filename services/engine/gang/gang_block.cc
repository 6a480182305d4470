#include "services/engine/gang/gang_block.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/gang/exchange.h"

namespace qcal::engine {
namespace {

// The exchanges of one block for one rank.
class GangBlock {
 public:
  GangBlock(Model& model, CalibActivations& acts, const Recipe& recipe, const GangPlan& plan,
            Transport* transport, const GangBlockOptions& options, StageTimes& times,
            const OacSource& oac, uint64_t seed)
      : be_(model.backend()),
        config_(model.config()),
        recipe_(recipe),
        plan_(plan),
        transport_(transport),
        options_(options),
        b_(acts.next_block),
        acts_(acts),
        runner_(model, acts, recipe, times, oac, seed) {}

  BlockRunner& runner() { return runner_; }

  absl::StatusOr<std::vector<LayerResult>> Run() {
    QCAL_RETURN_IF_ERROR(runner_.Begin());
    if (config_.IsMoeBlock(b_)) {
      // Begin refused the recipes that smooth, retrain or skip true_sequential on MoE models.
      for (LinearInput g : {LinearInput::kQkv, LinearInput::kO}) {
        QCAL_ASSIGN_OR_RETURN(InputPartials mine, runner_.CollectPartials(g));
        QCAL_ASSIGN_OR_RETURN(std::optional<InputPartials> kept, Contribute(g, std::move(mine)));
        QCAL_RETURN_IF_ERROR(SolveAndInstall(g, std::move(kept)));
        QCAL_RETURN_IF_ERROR(runner_.Push(g));
      }
      QCAL_RETURN_IF_ERROR(ShareTokenCounts());
      for (int u = 0; u < NumExpertUnits(config_); ++u) {
        for (LinearInput g : {LinearInput::kGateUp, LinearInput::kDown}) {
          QCAL_RETURN_IF_ERROR(SolveExpert(u, g));
        }
      }
      QCAL_RETURN_IF_ERROR(runner_.PushMoe());
      return runner_.Finish();
    }
    if (recipe_.smoothing.enabled()) QCAL_RETURN_IF_ERROR(Smooth());
    if (recipe_.gptq.true_sequential) {
      for (LinearInput g : kAllLinearInputs) {
        QCAL_ASSIGN_OR_RETURN(InputPartials mine, runner_.CollectPartials(g));
        QCAL_ASSIGN_OR_RETURN(std::optional<InputPartials> kept, Contribute(g, std::move(mine)));
        QCAL_RETURN_IF_ERROR(SolveAndInstall(g, std::move(kept)));
        QCAL_RETURN_IF_ERROR(runner_.Push(g));
      }
    } else {
      QCAL_ASSIGN_OR_RETURN(auto all, runner_.CollectFullPrecisionPartials());
      std::array<std::optional<InputPartials>, kNumLinearInputs> kept;
      for (LinearInput g : kAllLinearInputs) {
        const size_t i = static_cast<size_t>(g);
        QCAL_ASSIGN_OR_RETURN(kept[i], Contribute(g, std::move(all[i])));
      }
      for (LinearInput g : kAllLinearInputs) {
        QCAL_RETURN_IF_ERROR(SolveAndInstall(g, std::move(kept[static_cast<size_t>(g)])));
      }
      QCAL_RETURN_IF_ERROR(runner_.PushBlock());
    }
    if (recipe_.retrain.enabled) QCAL_RETURN_IF_ERROR(Retrain());
    return runner_.Finish();
  }

 private:
  int rank() const { return plan_.rank; }
  int64_t Width(LinearInput in) const { return LinearShape(config_, ConsumersOf(in)[0]).second; }
  MessageKey Key(int step, MessageKind kind, int item) const {
    return MessageKey{b_, step, kind, item, rank()};
  }
  absl::Status Send(int to, const MessageKey& key, std::string payload) {
    return Annotate(transport_->Send(to, key, std::move(payload)),
                    absl::StrCat("sending ", DescribeKey(key), " to rank ", to));
  }
  absl::StatusOr<std::string> Receive(int step, MessageKind kind, int item, int from) {
    const MessageKey key{b_, step, kind, item, from};
    auto payload = transport_->Receive(key, options_.receive_timeout);
    if (!payload.ok()) {
      return Annotate(payload.status(),
                      absl::StrCat("rank ", rank(), " receiving ", DescribeKey(key)));
    }
    return payload;
  }
  // The tree root holding a completed statistic, as it travels.
  TreeNode Root() const { return TreeNode{TreeDepth(plan_.total_chunks), 0}; }

  // Smoothing: partials to each input's owner, completed statistics from it to every rank.
  absl::Status Smooth() {
    QCAL_ASSIGN_OR_RETURN(SmoothingPartials mine, runner_.CollectSmoothingPartials());
    for (LinearInput in : kAllLinearInputs) {
      const size_t i = static_cast<size_t>(in);
      const int owner = plan_.StatOwner(in);
      if (owner == rank()) continue;
      QCAL_ASSIGN_OR_RETURN(std::string bytes,
                            SerializeActivationStatsPartials(Width(in), mine.inputs[i]));
      QCAL_RETURN_IF_ERROR(Send(owner,
                                Key(kStepSmoothing, MessageKind::kPartials, static_cast<int>(i)),
                                std::move(bytes)));
    }
    SmoothingPartials complete;
    for (LinearInput in : kAllLinearInputs) {
      const size_t i = static_cast<size_t>(in);
      if (plan_.StatOwner(in) != rank()) continue;
      TreePartials<ActivationStats> all = std::move(mine.inputs[i]);
      for (int q = 0; q < plan_.world; ++q) {
        if (q == rank()) continue;
        QCAL_ASSIGN_OR_RETURN(std::string bytes, Receive(kStepSmoothing, MessageKind::kPartials,
                                                         static_cast<int>(i), q));
        QCAL_ASSIGN_OR_RETURN(auto theirs, ParseActivationStatsPartials(Width(in), bytes));
        for (auto& p : theirs) all.push_back(std::move(p));
      }
      QCAL_ASSIGN_OR_RETURN(ActivationStats stats, CompleteTree(std::move(all), plan_.total_chunks,
                                                                ActivationStatsCombine()));
      complete.inputs[i].push_back({Root(), std::move(stats)});
      if (plan_.world == 1) continue;
      QCAL_ASSIGN_OR_RETURN(const std::string bytes,
                            SerializeActivationStatsPartials(Width(in), complete.inputs[i]));
      for (int q = 0; q < plan_.world; ++q) {
        if (q == rank()) continue;
        QCAL_RETURN_IF_ERROR(
            Send(q, Key(kStepSmoothing, MessageKind::kStatistic, static_cast<int>(i)), bytes));
      }
    }
    for (LinearInput in : kAllLinearInputs) {
      const size_t i = static_cast<size_t>(in);
      const int owner = plan_.StatOwner(in);
      if (owner == rank()) continue;
      QCAL_ASSIGN_OR_RETURN(std::string bytes, Receive(kStepSmoothing, MessageKind::kStatistic,
                                                       static_cast<int>(i), owner));
      QCAL_ASSIGN_OR_RETURN(complete.inputs[i], ParseActivationStatsPartials(Width(in), bytes));
    }
    QCAL_ASSIGN_OR_RETURN(const SmoothingStatistics stats,
                          runner_.CompleteSmoothing(std::move(complete)));
    QCAL_ASSIGN_OR_RETURN(BlockSmoothing smoothing, runner_.SolveSmoothing(stats));
    return runner_.InstallSmoothing(std::move(smoothing));
  }

  // Sends this rank's partials of group g to its statistic owner; the owner keeps its own.
  absl::StatusOr<std::optional<InputPartials>> Contribute(LinearInput g, InputPartials mine) {
    const int owner = plan_.StatOwner(g);
    if (owner == rank()) return std::optional<InputPartials>(std::move(mine));
    QCAL_ASSIGN_OR_RETURN(std::string bytes, SerializeInputPartials(be_, g, Width(g), mine));
    QCAL_RETURN_IF_ERROR(
        Send(owner, Key(StepOf(static_cast<int>(g)), MessageKind::kPartials, static_cast<int>(g)),
             std::move(bytes)));
    return std::optional<InputPartials>();
  }

  // The completed statistics of g on the owners of its consumers (nullopt elsewhere): the
  // statistic owner completes the tree from its own partials (`kept`) and everyone else's and
  // forwards the result; the other consumer owners receive it.
  absl::StatusOr<std::optional<InputStatistics>> Gather(LinearInput g,
                                                        std::optional<InputPartials> kept) {
    const int step = StepOf(static_cast<int>(g));
    const int item = static_cast<int>(g);
    const int owner = plan_.StatOwner(g);
    const std::vector<int> consumers = plan_.ConsumerOwners(g);
    if (owner == rank()) {
      InputPartials all = std::move(*kept);
      for (int q = 0; q < plan_.world; ++q) {
        if (q == rank()) continue;
        QCAL_ASSIGN_OR_RETURN(std::string bytes, Receive(step, MessageKind::kPartials, item, q));
        QCAL_ASSIGN_OR_RETURN(InputPartials theirs, ParseInputPartials(be_, g, Width(g), bytes));
        for (auto& p : theirs) all.push_back(std::move(p));
      }
      QCAL_ASSIGN_OR_RETURN(InputStatistics stats, runner_.Complete(g, std::move(all)));
      if (consumers.size() > 1) {
        InputPartials root;
        root.push_back({Root(), stats});
        QCAL_ASSIGN_OR_RETURN(const std::string bytes,
                              SerializeInputPartials(be_, g, Width(g), root));
        for (int q : consumers) {
          if (q != rank())
            QCAL_RETURN_IF_ERROR(Send(q, Key(step, MessageKind::kStatistic, item), bytes));
        }
      }
      return std::optional<InputStatistics>(std::move(stats));
    }
    if (std::find(consumers.begin(), consumers.end(), rank()) == consumers.end()) {
      return std::optional<InputStatistics>();
    }
    QCAL_ASSIGN_OR_RETURN(std::string bytes, Receive(step, MessageKind::kStatistic, item, owner));
    QCAL_ASSIGN_OR_RETURN(InputPartials root, ParseInputPartials(be_, g, Width(g), bytes));
    QCAL_ASSIGN_OR_RETURN(InputStatistics stats, runner_.Complete(g, std::move(root)));
    return std::optional<InputStatistics>(std::move(stats));
  }

  // Sends this rank's solved linears of `step` to every other rank (their host conversions waited
  // for first).
  absl::Status ShareSolved(int step, std::vector<SolvedLinear>& solved) {
    if (plan_.world == 1) return absl::OkStatus();
    for (SolvedLinear& s : solved) {
      if (s.conversion.valid()) {
        QCAL_ASSIGN_OR_RETURN(s.result.quantized, s.conversion.get());
      }
      const std::string bytes = SerializeSolvedLayer(s.result);
      for (int q = 0; q < plan_.world; ++q) {
        if (q == rank()) continue;
        QCAL_RETURN_IF_ERROR(
            Send(q, Key(step, MessageKind::kLayer, static_cast<int>(s.result.report.kind)), bytes));
      }
    }
    return absl::OkStatus();
  }

  // Solves the linears of g this rank owns, sends them to every other rank, and installs all of
  // g's linears in forward order.
  absl::Status SolveAndInstall(LinearInput g, std::optional<InputPartials> kept) {
    const int step = StepOf(static_cast<int>(g));
    QCAL_ASSIGN_OR_RETURN(std::optional<InputStatistics> stats, Gather(g, std::move(kept)));
    std::vector<LinearKind> owned;
    for (LinearKind k : ConsumersOf(g)) {
      if (plan_.Owns(k)) owned.push_back(k);
    }
    std::vector<SolvedLinear> solved;
    if (!owned.empty()) {
      QCAL_ASSIGN_OR_RETURN(solved, runner_.Solve(*stats, owned));
    }
    stats.reset();
    QCAL_RETURN_IF_ERROR(ShareSolved(step, solved));
    std::vector<SolvedLinear> install;
    size_t next_own = 0;
    for (LinearKind k : ConsumersOf(g)) {
      if (plan_.Owns(k)) {
        install.push_back(std::move(solved[next_own++]));
        continue;
      }
      QCAL_ASSIGN_OR_RETURN(std::string bytes, Receive(step, MessageKind::kLayer,
                                                       static_cast<int>(k), plan_.OwnerOf(k)));
      QCAL_ASSIGN_OR_RETURN(LayerResult r, ParseSolvedLayer(bytes));
      if (r.report.kind != k || r.report.block != b_) {
        return absl::DataLossError(absl::StrCat("rank ", rank(), ": received ", r.report.name,
                                                " as ", LinearPrefix(b_, k)));
      }
      SolvedLinear s;
      s.result = std::move(r);
      install.push_back(std::move(s));
    }
    return runner_.Install(std::move(install));
  }

  // MoE blocks: every rank sends its per-expert token counts to every other rank and sums all of
  // them in rank order (integers: exact).
  absl::Status ShareTokenCounts() {
    QCAL_ASSIGN_OR_RETURN(const std::vector<int64_t> mine, runner_.RouteChunks());
    std::string bytes(mine.size() * sizeof(int64_t), '\0');
    std::memcpy(bytes.data(), mine.data(), bytes.size());
    for (int q = 0; q < plan_.world; ++q) {
      if (q != rank()) {
        QCAL_RETURN_IF_ERROR(Send(q, Key(kStepRouting, MessageKind::kTokenCounts, 0), bytes));
      }
    }
    std::vector<int64_t> total(mine.size(), 0);
    for (int q = 0; q < plan_.world; ++q) {
      std::vector<int64_t> theirs = mine;
      if (q != rank()) {
        QCAL_ASSIGN_OR_RETURN(std::string got,
                              Receive(kStepRouting, MessageKind::kTokenCounts, 0, q));
        if (got.size() != bytes.size()) {
          return absl::DataLossError(absl::StrCat("rank ", rank(), ": token counts of ", got.size(),
                                                  " bytes from rank ", q, ", expected ",
                                                  bytes.size()));
        }
        std::memcpy(theirs.data(), got.data(), got.size());
      }
      for (size_t e = 0; e < total.size(); ++e) total[e] += theirs[e];
    }
    return runner_.SetExpertCounts(std::move(total));
  }

  // Expert unit u's input g: partials to the unit's owner, which completes and solves them and
  // sends the solved linears to every other rank; every rank installs them in forward order.
  absl::Status SolveExpert(int u, LinearInput g) {
    const int step = ExpertStep(u);
    const int owner = plan_.ExpertOwner(u);
    const int expert = ExpertOfUnit(config_, u);
    const int64_t width = LinearShape(config_, b_, LinearId(ConsumersOf(g)[0], expert)).second;
    QCAL_ASSIGN_OR_RETURN(InputPartials mine, runner_.CollectExpertPartials(u, g));
    if (owner != rank()) {
      QCAL_ASSIGN_OR_RETURN(std::string bytes, SerializeInputPartials(be_, g, width, mine));
      QCAL_RETURN_IF_ERROR(
          Send(owner, Key(step, MessageKind::kPartials, static_cast<int>(g)), std::move(bytes)));
      std::vector<SolvedLinear> install;
      for (LinearKind k : ConsumersOf(g)) {
        QCAL_ASSIGN_OR_RETURN(std::string got,
                              Receive(step, MessageKind::kLayer, static_cast<int>(k), owner));
        QCAL_ASSIGN_OR_RETURN(LayerResult r, ParseSolvedLayer(got));
        if (r.report.kind != k || r.report.expert != expert || r.report.block != b_) {
          return absl::DataLossError(absl::StrCat("rank ", rank(), ": received ", r.report.name,
                                                  " as ",
                                                  LinearPrefix(config_, b_, LinearId(k, expert))));
        }
        SolvedLinear s;
        s.result = std::move(r);
        install.push_back(std::move(s));
      }
      return runner_.Install(std::move(install));
    }
    InputPartials all = std::move(mine);
    for (int q = 0; q < plan_.world; ++q) {
      if (q == rank()) continue;
      QCAL_ASSIGN_OR_RETURN(std::string bytes,
                            Receive(step, MessageKind::kPartials, static_cast<int>(g), q));
      QCAL_ASSIGN_OR_RETURN(InputPartials theirs, ParseInputPartials(be_, g, width, bytes));
      for (auto& p : theirs) all.push_back(std::move(p));
    }
    std::vector<SolvedLinear> solved;
    {
      QCAL_ASSIGN_OR_RETURN(const InputStatistics stats, runner_.Complete(g, std::move(all)));
      QCAL_ASSIGN_OR_RETURN(solved, runner_.Solve(stats, ConsumersOf(g), expert));
    }
    QCAL_RETURN_IF_ERROR(ShareSolved(step, solved));
    return runner_.Install(std::move(solved));
  }

  // Retraining (DESIGN section 2, step 3.4): the trainer (kRetrainRank) gathers every linear's base
  // from its owner and every chunk's inputs and targets from the rank holding it, trains, and sends
  // the retrained linears to every other rank, which installs them and pushes its own chunks.
  absl::Status Retrain() {
    if (rank() != kRetrainRank) {
      for (LinearKind k : kAllLinears) {
        if (!plan_.Owns(k)) continue;
        QCAL_ASSIGN_OR_RETURN(std::string bytes, SerializeRetrainBase(runner_.retrain_base(k),
                                                                      runner_.retrain_fisher(k)));
        QCAL_RETURN_IF_ERROR(Send(kRetrainRank,
                                  Key(kStepRetrain, MessageKind::kRetrainBase, static_cast<int>(k)),
                                  std::move(bytes)));
      }
      const std::vector<Tensor>& inputs = runner_.retrain_inputs();
      const std::vector<Tensor>& targets = runner_.retrain_targets();
      for (size_t i = 0; i < inputs.size(); ++i) {
        QCAL_ASSIGN_OR_RETURN(std::string bytes,
                              SerializeRetrainSamples(be_, inputs[i], targets[i]));
        const int chunk = plan_.local().begin + static_cast<int>(i);
        QCAL_RETURN_IF_ERROR(Send(kRetrainRank,
                                  Key(kStepRetrain, MessageKind::kRetrainSamples, chunk),
                                  std::move(bytes)));
      }
      std::vector<LayerResult> trained;
      for (LinearKind k : kAllLinears) {
        QCAL_ASSIGN_OR_RETURN(std::string bytes, Receive(kStepRetrain, MessageKind::kRetrained,
                                                         static_cast<int>(k), kRetrainRank));
        QCAL_ASSIGN_OR_RETURN(LayerResult r, ParseSolvedLayer(bytes));
        trained.push_back(std::move(r));
      }
      return runner_.InstallRetrained(std::move(trained));
    }
    for (LinearKind k : kAllLinears) {
      if (plan_.Owns(k)) continue;
      QCAL_ASSIGN_OR_RETURN(std::string bytes, Receive(kStepRetrain, MessageKind::kRetrainBase,
                                                       static_cast<int>(k), plan_.OwnerOf(k)));
      const auto [d_out, d_in] = LinearShape(config_, k);
      Tensor base, fisher;
      QCAL_RETURN_IF_ERROR(ParseRetrainBase(bytes, d_out, d_in, &base, &fisher));
      runner_.SetRetrainBase(k, std::move(base), std::move(fisher));
    }
    std::vector<Tensor> inputs, targets;
    std::vector<int> batch;
    for (int q = 0; q < plan_.world; ++q) {
      const ChunkRange& range = plan_.chunks[static_cast<size_t>(q)];
      for (int c = range.begin; c < range.end; ++c) {
        if (q == rank()) {
          inputs.push_back(runner_.retrain_inputs()[static_cast<size_t>(c - range.begin)]);
          targets.push_back(runner_.retrain_targets()[static_cast<size_t>(c - range.begin)]);
          batch.push_back(acts_.chunk_batch[static_cast<size_t>(c - range.begin)]);
          continue;
        }
        QCAL_ASSIGN_OR_RETURN(std::string bytes,
                              Receive(kStepRetrain, MessageKind::kRetrainSamples, c, q));
        // Every chunk but the last holds kCalibChunk samples; the rows say how many.
        QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(bytes, "retraining samples"));
        QCAL_ASSIGN_OR_RETURN(Tensor probe, file->Get("inputs"));
        const int64_t rows = probe.rank() == 2 ? probe.dim(0) : 0;
        if (rows < 1 || rows % acts_.seq_len != 0) {
          return absl::DataLossError(absl::StrCat("rank ", rank(), ": retraining chunk ", c,
                                                  " from rank ", q, " holds ", rows, " rows"));
        }
        Tensor x, y;
        QCAL_RETURN_IF_ERROR(ParseRetrainSamples(be_, bytes, rows, config_.hidden_size, &x, &y));
        inputs.push_back(std::move(x));
        targets.push_back(std::move(y));
        batch.push_back(static_cast<int>(rows / acts_.seq_len));
      }
    }
    QCAL_ASSIGN_OR_RETURN(std::vector<LayerResult> trained,
                          runner_.TrainBlock(inputs, targets, batch));
    for (const LayerResult& r : trained) {
      const std::string bytes = SerializeSolvedLayer(r);
      for (int q = 0; q < plan_.world; ++q) {
        if (q == rank()) continue;
        QCAL_RETURN_IF_ERROR(Send(
            q, Key(kStepRetrain, MessageKind::kRetrained, static_cast<int>(r.report.kind)), bytes));
      }
    }
    return absl::OkStatus();
  }

  kernels::Backend& be_;
  const ModelConfig& config_;
  const Recipe& recipe_;
  const GangPlan& plan_;
  Transport* transport_;
  const GangBlockOptions& options_;
  const int b_;
  const CalibActivations& acts_;
  BlockRunner runner_;
};

}  // namespace

absl::Status GangBlockOptions::Validate() const {
  if (receive_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("receive timeout must be positive, got ",
                                                   absl::FormatDuration(receive_timeout)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerResult>> RunGangBlock(Model& model, CalibActivations& acts,
                                                      const Recipe& recipe, const GangPlan& plan,
                                                      Transport* transport,
                                                      const GangBlockOptions& options,
                                                      StageTimes& times, const OacSource& oac,
                                                      uint64_t seed) {
  QCAL_RETURN_IF_ERROR(recipe.Validate());
  QCAL_RETURN_IF_ERROR(plan.Validate());
  QCAL_RETURN_IF_ERROR(options.Validate());
  if (transport == nullptr && plan.world > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", plan.rank, " of a gang of ", plan.world, " has no transport"));
  }
  const int b = acts.next_block;
  if (b < 0 || b >= model.num_blocks()) {
    return absl::OutOfRangeError(absl::StrCat("block ", b, " is outside the model"));
  }
  const ChunkRange& local = plan.local();
  if (acts.first_chunk != local.begin || static_cast<int>(acts.chunks.size()) != local.size() ||
      acts.total_chunks != plan.total_chunks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", plan.rank, " holds chunks [", acts.first_chunk, ", ",
        acts.first_chunk + acts.chunks.size(), ") of ", acts.total_chunks, "; its plan gives it [",
        local.begin, ", ", local.end, ") of ", plan.total_chunks));
  }
  GangBlock block(model, acts, recipe, plan, transport, options, times, oac, seed);
  block.runner().set_before_training(options.retrain_block);
  return block.Run();
}

}  // namespace qcal::engine
