// The training loop every entry point runs — `duplex train`, duplex.torch's Pipeline.fit, examples/custom_stage:
// resume from a checkpoint, the steps up to a target, a callback before and after each step, a checkpoint every N
// steps keeping the newest K, and one at the end of the run. A collective: every rank of the trainer's world calls
// it with the same options, and the callbacks run on every rank (print on one). A run that diverges stops with
// DivergenceError (FitOptions::max_bad_steps).
//
//   FitOptions f;
//   f.steps = 100, f.save = "ckpt", f.save_every = 10, f.keep = 3, f.resume = "ckpt";
//   FitResult r = fit(trainer, f, {.on_step = [](const StepMetrics& m) { ... }});   // r.start, r.last_loss
#pragma once

#include <cmath>
#include <functional>
#include <string>

#include "runtime/train/pipeline_trainer.hpp"

namespace duplex {

struct FitOptions {
    long steps = 0;          // train until the trainer has done this many steps
    std::string save;        // checkpoint root ("": no checkpoints)
    int save_every = 0;      // > 0: a checkpoint every N steps too (the last step's is the end-of-run one)
    int keep = 0;            // checkpoints kept under `save`, the newest (0: all)
    std::string resume;      // a checkpoint directory, or a root whose newest checkpoint resumes ("": start fresh)
    // A step whose loss or gradient norm is not finite is not applied (StepMetrics::applied) and not checkpointed;
    // after this many in a row fit stops with DivergenceError, the last checkpoint as it was (0: never stops).
    int max_bad_steps = 3;
    void validate() const;   // ConfigError naming the option
};

struct FitCallbacks {
    std::function<void(long step, double seconds)> on_resume;  // after loading: the step resumed after
    std::function<void(long step)> before_step;                 // the 1-based step about to run (e.g. stage its data)
    // After each step, before its checkpoint (a save that fails keeps the step's metrics).
    std::function<void(const StepMetrics& m)> on_step;
    std::function<void(const std::string& dir, const char* why, double seconds)> on_save;  // why: every N or end
};

struct FitResult {
    long start = 0;       // the step resumed after (0: fresh)
    long steps_done = 0;  // the trainer's steps when fit returned
    double first_loss = std::nan(""), last_loss = std::nan("");  // of the steps this call ran
};

template <typename T>
FitResult fit(PipelineTrainer<T>& trainer, const FitOptions& o, const FitCallbacks& cb = {});

}  // namespace duplex
