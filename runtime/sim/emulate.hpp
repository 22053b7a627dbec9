// Emulate mode's Stage: the same executor, ranks and transfers as math mode, with each chunk's compute a
// timed wait from the cost model (or given costs) and expert exchanges that carry sizes without payloads.
//
// The stage's activations are meta tensors (dtype and shape, no storage); the executor's TimedPipeTransport
// delays each by its link's latency + bytes / bandwidth. An expert exchange runs the moves the host exchange
// would (parallel/expert_plan.hpp, exchange_traffic), one round per hop: every EP peer gets a small header
// with the time the rank's link would have delivered its real byte count (the rank's total on that link class
// over the link's bandwidth) plus the counts the next hop needs; the receiver waits for the latest. The bytes
// charged are the plan's, count messages included — what the communicator counts in math mode for the same
// routing (tests/runtime/exchange_traffic_test.cpp). Routings are real (node-limited top-K on synthetic
// affinities). Routing every token of every microbatch would cost more CPU than the emulated compute it stands
// beside (DeepSeek-V3: 16K tokens x 256 experts per layer and microbatch), so each stage routes
// kRoutingSamples samples of up to kSampleTokens tokens per MoE layer once, in prepare(), and a microbatch
// uses one of them with its counts scaled to its token count. Exchanges wait through the executor, so in an
// F&B pair the other half computes meanwhile (the executor runs emulate with one compute stream per rank).
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "parallel/expert_plan.hpp"
#include "runtime/sim/cost_model.hpp"
#include "runtime/exec/stage.hpp"

namespace duplex {

struct EmulateOptions {
    ModelConfig model;
    int sequences = 1;       // per microbatch
    int elem_bytes = 4;      // of activations
    bool recompute = false;
    ChunkCosts costs{};      // seconds per chunk; f == 0: from the cost model per stage
    CostModel cost_model = CostModel::preset("h800");
    bool hierarchical = true;  // EP groups spanning nodes take the node-limited path
    uint64_t seed = 1;
    // The experts of each slot of a microbatch on `rank` in MoE layer `layer` (a fixed routing, for tests that
    // compare emulate's bytes with math mode's); unset: sampled routings.
    std::function<std::vector<int>(int layer, int rank)> routing;
};

// Nominal expert-exchange bytes sent by the emulated stages of a rank (payloads are elided).
struct EmulatedBytes {
    std::atomic<uint64_t> intra{0}, inter{0};
};

class EmulatedStage : public Stage {
public:
    EmulatedStage(const EmulateOptions& o, const StageInfo& info, std::shared_ptr<EmulatedBytes> bytes);
    std::string name() const override { return name_; }
    TensorSpec input_spec(const Microbatch& mb) const override;
    TensorSpec output_spec(const Microbatch& mb) const override { return input_spec(mb); }
    Tensor forward(const Microbatch& mb, const TensorView& input) override;
    double loss(const Microbatch& mb) override { return 0; }
    Tensor backward_input(const Microbatch& mb, const TensorView& grad_output) override;
    void backward_weight(const Microbatch& mb) override;
    std::vector<StateBuffer> state() override { return {}; }
    void zero_grad() override {}
    // Samples the routings its exchanges carry the byte counts of, over the call's EP group.
    void prepare(StageContext& ctx) override;
    const ChunkCosts& costs() const { return costs_; }

    struct LayerShare {
        int layer;
        bool moe;
        double attn, ffn;  // fractions of the chunk's compute
    };
    static constexpr int kRoutingSamples = 4, kSampleTokens = 512;

private:
    void compute(double seconds, const Microbatch& mb);
    std::vector<std::vector<int64_t>> round(const Microbatch& mb, uint32_t tag, const std::vector<double>& nbytes,
                                            const std::vector<std::vector<int64_t>>& counts, int width,
                                            const std::string& name);
    uint32_t tag_of(const Microbatch& mb, int layer, Exchange exchange, int round) const;
    // Runs the hop-`hop` moves of `moves` as one round (a round per hop of the exchange when hop < 0).
    std::vector<std::vector<int64_t>> hop_round(const Microbatch& mb, int layer, Exchange which,
                                                const std::vector<TrafficMove>& moves, int hop, int round_index,
                                                const std::vector<std::vector<int64_t>>& counts, int width);
    void dispatch(const Microbatch& mb, int layer);
    void exchange(const Microbatch& mb, int layer, Exchange which);
    void sample_routings(const Communicator& group);

    EmulateOptions o_;
    StageInfo info_;
    std::shared_ptr<Communicator> group_;  // the EP group (from prepare; null: EP = 1)
    std::string name_;
    ChunkCosts costs_;
    std::vector<LayerShare> shares_;
    std::shared_ptr<EmulatedBytes> bytes_;
    std::mutex mutex_;
    std::map<std::pair<int, int>, ExchangeTraffic> plans_;  // by (microbatch, layer): the moves of its exchanges
    std::set<int> fused_;                           // microbatches whose W ran inside their backward
    // By MoE layer: the sampled routings' dispatch plans, counts scaled to a microbatch's tokens.
    std::map<int, std::vector<DispatchPlan>> routed_;
    ExpertPath path_ = ExpertPath::Flat;
};

}  // namespace duplex
