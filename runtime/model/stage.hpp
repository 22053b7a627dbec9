// A pipeline stage of the reference model: a contiguous range of layers; the first stage also owns the
// embedding, the last the final norm, the output head and the loss. This is the interface the executor
// drives, microbatch by microbatch:
//
//   ModelStage<float> stage(cfg, /*first_layer=*/0, /*num_layers=*/cfg.layers, /*embedding=*/true, /*head=*/true, seed);
//   stage.forward(mb, batch, {});           // F
//   stage.backward_input(mb, {});           // B: input gradient; weight-gradient work is queued
//   stage.backward_weight(mb);              // W: runs the queued weight gradients (may come much later)
//   for (Param<float>* p : stage.parameters()) ...   // p->value, p->grad
//
// Parameters are initialized from (seed, parameter name), so any split into stages starts from the same
// model. With recompute on, RMSNorm outputs and SwiGLU activations are dropped after forward and recomputed
// in backward (bitwise the same results); the ledger shows the saving.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "memory/ledger.hpp"
#include "runtime/exec/stage.hpp"
#include "runtime/model/batch.hpp"
#include "runtime/model/config.hpp"
#include "runtime/model/expert_exchange.hpp"

namespace duplex {

template <typename T>
struct Param {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<T> value, grad;
    bool is_expert = false;  // routed-expert weights (their own data-parallel group under expert parallelism)
};

// Where the routed experts of the MoE layers compute. Without one, ModelStage runs them on the CPU; the device
// implementation (runtime/device/device_experts.hpp) runs them on a GPU. For one (key = layer and microbatch): forward,
// later backward, later the weight-gradient work backward returned. Calls for different keys may come from
// different threads at the same time (the F&B pairs of DualPipe).
template <typename T>
class ExpertCompute {
public:
    struct Weights {
        std::vector<Param<T>*> w1, w3, w2;  // per local expert: SwiGLU MLP [hidden, ffn], [hidden, ffn], [ffn, hidden]
    };
    virtual ~ExpertCompute() = default;
    virtual std::string name() const = 0;
    // rows[e] [n_e, hidden] -> out[e] [n_e, hidden] = (silu(x W1) * (x W3)) W2; keeps what backward needs.
    virtual void forward(uint64_t key, const Weights& w, const std::vector<std::vector<T>>& rows,
                         std::vector<std::vector<T>>& out) = 0;
    // d_out[e] -> d_rows[e]; returns the weight-gradient work (adds into Param::grad), which frees the rest.
    virtual std::function<void()> backward(uint64_t key, const Weights& w, const std::vector<std::vector<T>>& d_out,
                                           std::vector<std::vector<T>>& d_rows) = 0;
    // The weights' values may have changed since the last forward (ModelStage::zero_grad, at each step's start):
    // an implementation that keeps copies of them refreshes them at the next forward.
    virtual void weights_changed() {}

    // Whether it reads rows where an expert-major exchange leaves them on `where` (a device index; -1 the host):
    // then the stage hands it ResidentRows from the exchange and gives what it returns to the exchange, and no row
    // goes through the host between dispatch and combine.
    virtual bool reads_rows_on(int where) const {
        (void)where;
        return false;
    }
    // forward and backward on rows where they are (expert-major, ResidentRows::first), with results laid out alike.
    virtual std::shared_ptr<ResidentRows> forward_resident(uint64_t key, const Weights& w,
                                                           std::shared_ptr<ResidentRows> rows);
    virtual std::function<void()> backward_resident(uint64_t key, const Weights& w, std::shared_ptr<ResidentRows> d_out,
                                                    std::shared_ptr<ResidentRows>& d_rows);
};

// Which shard of the routed experts a stage holds: rank `rank` of an expert-parallel group of `ranks`.
struct ExpertShard {
    int rank = 0, ranks = 1;
};

template <typename T>
class ModelStage {
public:
    // The routed experts exchange through `exchange` (forward) and `backward_exchange` (default: the same); without
    // one, the stage holds the `shard` of them (all with the default), exchanged locally when it is all of them and
    // through the exchanges set_exchanges gives it before the first forward otherwise.
    ModelStage(const ModelConfig& cfg, int first_layer, int num_layers, bool has_embedding, bool has_head,
               uint64_t seed, std::shared_ptr<ExpertExchange<T>> exchange = nullptr,
               std::shared_ptr<ExpertExchange<T>> backward_exchange = nullptr, ExpertShard shard = {});
    ~ModelStage();
    // The exchanges of a stage built without them; ConfigError unless they hold the stage's shard.
    void set_exchanges(std::shared_ptr<ExpertExchange<T>> exchange, std::shared_ptr<ExpertExchange<T>> backward_exchange);

    // F: the first stage reads batch.tokens, the others `input` [tokens, hidden]. Returns the output hidden
    // states (empty on the last stage, which computes the loss). With a stage call's context, the expert
    // exchanges run on its expert lanes and are waited for through it (else inline).
    std::vector<T> forward(int mb, const Batch& batch, std::vector<T> input, StageContext* ctx = nullptr);
    double loss(int mb) const;      // last stage, after forward: the task's cross-entropy
    double aux_loss(int mb) const;  // any stage: its MoE layers' sequence-wise balance loss (0 when alpha = 0)
    // B: gradient of the stage input (empty on the first stage); queues the weight-gradient work of mb.
    std::vector<T> backward_input(int mb, std::vector<T> grad_output, StageContext* ctx = nullptr);
    // W: the queued weight gradients of mb, accumulated into Param::grad.
    void backward_weight(int mb);
    // B and W together.
    std::vector<T> backward(int mb, std::vector<T> grad_output, StageContext* ctx = nullptr);
    // Forgets microbatch mb (an evaluation forward no backward follows): what its forward kept is released.
    void discard(int mb);

    std::vector<Param<T>*> parameters();
    // Zeroes every gradient and starts a step: the expert compute is told the weights may have changed (a device
    // keeps its copies of them from one zero_grad to the next, so change weights only between steps).
    void zero_grad();
    void set_recompute(bool on) { recompute_ = on; }
    bool recompute() const { return recompute_; }
    void set_loss_scale(double s) { loss_scale_ = s; }  // d(step loss)/d(microbatch loss), e.g. 1/N
    // Runs the routed experts there (nullptr: on the CPU, the default).
    void set_expert_compute(std::shared_ptr<ExpertCompute<T>> c) { expert_compute_ = std::move(c); }
    const std::shared_ptr<ExpertCompute<T>>& expert_compute() const { return expert_compute_; }
    MemoryLedger& ledger() { return ledger_; }
    const ModelConfig& config() const { return cfg_; }
    int first_layer() const { return first_layer_; }
    int num_layers() const { return num_layers_; }
    bool has_embedding() const { return has_embedding_; }
    bool has_head() const { return has_head_; }

    // Tokens per expert routed since the last call, per MoE layer of this stage (global expert ids).
    std::vector<std::vector<int64_t>> take_expert_counts();
    // The selection bias per MoE layer; update with the step's whole-batch counts.
    std::vector<std::vector<double>>& router_bias() { return bias_; }
    void update_router_bias(const std::vector<std::vector<int64_t>>& counts);

    struct Impl;

private:
    ModelConfig cfg_;
    int first_layer_, num_layers_;
    bool has_embedding_, has_head_;
    bool recompute_ = false;
    double loss_scale_ = 1.0;
    std::shared_ptr<ExpertCompute<T>> expert_compute_;
    MemoryLedger ledger_;
    std::vector<std::vector<double>> bias_;
    std::unique_ptr<Impl> impl_;
};

}  // namespace duplex
