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
//
// The executor checks every tensor a stage returns against output_spec()/input_spec(): a wrong shape, dtype
// or device is a StageError naming the stage, the microbatch and expected vs got, on the rank where it
// happened (the others fail with the communicator's error, never hang).
//
// Waits inside a stage call (an expert dispatch or combine) go through the StageContext of the call, so the
// executor, not the stage, decides what runs during them: inside a DualPipe F&B pair the other half computes.
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

// Tokens of one microbatch: sequences x seq_len input ids and their targets.
struct Batch {
    int sequences = 0;
    int seq_len = 0;
    std::vector<int> tokens, targets;  // [sequences * seq_len]
    int num_tokens() const { return sequences * seq_len; }
};

class StageContext;

// One microbatch as a stage sees it.
struct Microbatch {
    int id = 0;          // this replica's microbatch id within the step (the key of the stage's stash)
    int global = 0;      // position in the step's global batch: dp_index * N + id
    int step = 0;        // 1-based optimizer step
    const Batch* batch = nullptr;  // first and last stage, when the trainer has a batch source
    // backward_input only: backward_weight of this microbatch follows at once in the same call (BW, or the
    // backward of an F&B pair), so a stage may fuse the two.
    bool weight_follows = false;
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
    // Expert parallelism: this rank's EP group (forward exchanges) and a second communicator over the same ranks
    // for backward exchanges, so the two halves of an F&B pair never interleave collectives on one. Null: EP = 1.
    std::shared_ptr<Communicator> ep_group, ep_group_backward;
    // The executor's expert-exchange service (EP > 1): dispatch and combine submitted here return Work, waited
    // through wait_in_stage.
    std::shared_ptr<ExpertService> expert_service;
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
    // The gradient of each has the same spec.
    virtual TensorSpec input_spec(const Microbatch& mb) const = 0;
    virtual TensorSpec output_spec(const Microbatch& mb) const = 0;

    virtual Tensor forward(const Microbatch& mb, const TensorView& input) = 0;
    virtual double loss(const Microbatch& mb) = 0;
    virtual Tensor backward_input(const Microbatch& mb, const TensorView& grad_output) = 0;
    virtual void backward_weight(const Microbatch& mb) = 0;

    virtual std::vector<StateBuffer> state() = 0;
    virtual void zero_grad();  // default: zeroes every parameter's gradient (CPU)

    // Per-step statistics the trainer sums over every rank by name (each copy of a stage reports what its own
    // microbatches produced), then hands back to every stage in end_step before the next step. The built-in
    // model uses them for the expert counts that drive its router-bias update.
    virtual std::map<std::string, std::vector<double>> take_statistics() { return {}; }
    virtual void end_step(const std::map<std::string, std::vector<double>>& summed) {}
};

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
    // Marks the start of a piece of compute. With one compute stream per rank (ExecutorOptions::exclusive_compute,
    // emulate mode) this is where a call takes the stream, holding it to its next wait; if the other half of an
    // F&B pair waits for the stream, it goes first (as kernels queued on one stream interleave). Without it
    // (math mode: stages compute on their own threads or devices) it does nothing.
    virtual void compute_begins() = 0;
    // The context of the stage call running on this thread (null outside one): lets code below a stage (an
    // expert exchange) route its waits through the executor without the stage passing it down.
    static StageContext* current();

protected:
    static void set_current(StageContext* c);
};

// Waits through the current stage call's context when there is one, else plainly.
void wait_in_stage(const WorkPtr& work, const std::string& what);

}  // namespace duplex
