// The Stage contract: what a model hands Duplex, one pipeline stage at a time, and what the one executor
// (runtime/exec/executor.hpp) drives. A stage is a contiguous piece of the model; the executor calls it
// microbatch by microbatch in the order of its rank's instruction list:
//
//   forward(mb, input)            F: the activation from the previous stage (empty on the first) -> output
//                                    (an empty tensor on the last stage, which computes the loss)
//   loss(mb)                      last stage, after forward: that microbatch's loss
//   backward_input(mb, grad_out)  B: gradient of the output (empty on the last stage) -> gradient of the input
//                                    (empty on the first stage); weight-gradient work may be deferred
//   backward_weight(mb)           W: the deferred weight gradients of mb, accumulated into the gradients
//   state()                       every buffer that is trained, averaged or checkpointed, by name
//   prepare(ctx)                  once, before the first step, on every rank in stage order: set-up that needs
//                                 the executor's services (an expert-parallel exchange over the stage's group)
//
// The executor checks every tensor a stage returns against output_spec()/input_spec(): a wrong shape, dtype
// or device is a StageError naming the stage, the microbatch and expected vs got, on the rank where it
// happened (the others fail with the communicator's error, never hang).
//
// A stage knows what it is (StageInfo: its index, its layers, its loss scale, its dtype and device, its place in
// the expert-parallel group) and nothing of the model around it. What it may ask the executor for comes with each
// call (Microbatch::ctx, a StageContext): waits that let the executor decide what runs meanwhile (inside a DualPipe
// F&B pair, the other half computes), and the expert-parallel group with the lanes its exchanges run on.
// Threads: calls on one Stage object never overlap; the two halves of an F&B pair call two different stages
// of the rank from two threads at once.
//
//   class MyStage : public Stage { ... };
//   StageFactory f = [](const StageInfo& info) { return std::make_unique<MyStage>(info); };
//   Trainer<float> t(world, plan, f);      // runtime/train/trainer.hpp
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "core/error.hpp"
#include "core/tensor.hpp"
#include "runtime/exec/expert_service.hpp"

namespace duplex {

// A microbatch's data as its first and last stage see it: named tensors from the trainer's data source (the
// built-in one gives "tokens" and "targets", int32 [sequences, seq_len]). Valid for the length of the call.
using MicrobatchData = std::map<std::string, TensorView>;

class StageContext;

// One microbatch as a stage sees it.
struct Microbatch {
    int id = 0;          // this replica's microbatch id within the step (the key of the stage's stash)
    int global = 0;      // position in the step's global batch: dp_index * N + id
    int step = 0;        // 1-based optimizer step
    const MicrobatchData* data = nullptr;  // first and last stage, when the trainer has a data source
    // backward_input only: backward_weight of this microbatch follows at once in the same call (BW, or the
    // backward of an F&B pair), so a stage may fuse the two.
    bool weight_follows = false;
    // forward and loss only: an evaluation run, no backward follows — the stage keeps nothing for one (what its
    // forward saved is released once the call returns; on the last stage once loss() returns).
    bool forward_only = false;
    StageContext* ctx = nullptr;   // the executor's services for this call (never null inside the executor)
};

enum class StateKind { Parameter, Buffer };

// A named, typed, flat piece of a stage's state. Parameters come with their gradient (same dtype and shape)
// and are trained (ZeRO-1 AdamW over their data-parallel group); buffers are carried (checkpointed, summed or
// set by the stage itself), e.g. the router's load-balancing bias.
struct StateBuffer {
    std::string name;   // unique in the whole model: the same name on every rank that holds a copy
    StateKind kind = StateKind::Parameter;
    TensorView value;
    TensorView grad;    // parameters only
    bool expert = false;  // sharded over the expert-data-parallel group (routed experts under EP)
    bool decay = true;    // AdamW weight decay applies
};

// What the factory is told about the stage it builds.
struct StageInfo {
    int stage = 0;        // model stage 0..num_stages-1
    int num_stages = 1;
    int first_layer = 0;  // the run plan's layer split (layers_of_stage), for models made of layers
    int num_layers = 0;
    double loss_scale = 1;  // d(step loss) / d(microbatch loss): 1 / (microbatches x DP)
    int rank = 0;           // world rank
    DType dtype = DType::F32;        // the element type the trainer runs (its parameters and activations)
    Device device = Device::cpu();   // where the trainer expects the stage's tensors
    // The stage's place in its expert-parallel group (ep_size 1: none): which shard of the experts it holds. The
    // group itself comes with the calls (StageContext::experts()).
    int ep_rank = 0, ep_size = 1;
};

// Thrown by the executor for a stage that broke the contract.
class StageError : public Error {
public:
    using Error::Error;
};

class Stage {
public:
    virtual ~Stage() = default;
    virtual std::string name() const = 0;  // for messages: "stage 2 (layers 4..5)"

    // The activation this stage receives (stages > 0) and the one it sends on (stages < last), per microbatch.
    // The gradient of each has the same spec. Dimensions of TensorSpec::kAnnounced are the sender's to choose,
    // microbatch by microbatch (a sequence length that changes from step to step, several tensors packed into
    // bytes): the executor sends the shape ahead of the tensor. Both sides of a boundary announce the same
    // dimensions (stage s's output_spec and stage s+1's input_spec).
    virtual TensorSpec input_spec(const Microbatch& mb) const = 0;
    virtual TensorSpec output_spec(const Microbatch& mb) const = 0;

    virtual Tensor forward(const Microbatch& mb, const TensorView& input) = 0;
    virtual double loss(const Microbatch& mb) = 0;
    virtual Tensor backward_input(const Microbatch& mb, const TensorView& grad_output) = 0;
    virtual void backward_weight(const Microbatch& mb) = 0;

    virtual std::vector<StateBuffer> state() = 0;
    virtual void zero_grad();  // default: zeroes every parameter's gradient (CPU)

    // Called once before the first step, outside any step, for every stage of every rank in stage order, so
    // collectives over the expert-parallel group (ctx.experts()) line up. Default: nothing to set up.
    virtual void prepare(StageContext& ctx) {}

    // Per-step statistics the trainer sums over every rank by name (each copy of a stage reports what its own
    // microbatches produced), then hands back to every stage in end_step before the next step. The built-in
    // model uses them for the expert counts that drive its router-bias update. One name has a meaning to the
    // trainer: kAuxLossStatistic, one value, the auxiliary losses of the stage's microbatches summed; the step
    // reports the world's sum per microbatch as its auxiliary loss.
    virtual std::map<std::string, std::vector<double>> take_statistics() { return {}; }
    virtual void end_step(const std::map<std::string, std::vector<double>>& summed) {}
};

inline constexpr const char* kAuxLossStatistic = "aux_loss";

using StageFactory = std::function<std::unique_ptr<Stage>(const StageInfo&)>;

// The executor's services to a stage call.
class StageContext {
public:
    virtual ~StageContext() = default;
    // Waits for `work`, recorded as communication named `what`; the rank's compute is free meanwhile.
    virtual void wait(const WorkPtr& work, const std::string& what) = 0;
    // Waits for a blocking call the same way (an exchange written as a synchronous collective).
    virtual void wait_for(const std::function<void()>& fn, const std::string& what) = 0;
    // True inside an overlapped F&B pair.
    virtual bool in_fb_pair() const = 0;
    // The stage's expert-parallel group and the lanes its exchanges run on (null: no group, EP = 1). Work submitted
    // there is waited for through wait(), so the executor decides what runs meanwhile.
    virtual ExpertService* experts() const = 0;
    // Marks the start of a piece of compute. With one compute stream per rank (ExecutorOptions::exclusive_compute,
    // emulate mode) this is where a call takes the stream, holding it to its next wait; if the other half of an
    // F&B pair waits for the stream, it goes first (as kernels queued on one stream interleave). Without it
    // (math mode: stages compute on their own threads or devices) it does nothing.
    virtual void compute_begins() = 0;
};

}  // namespace duplex
