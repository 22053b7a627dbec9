// Emulate mode's step-end gradient synchronization: the seconds the cost model charges each stage a rank holds
// (runtime/sim/grad_sync.hpp, as the simulator charges them), spent on the rank's links one stage after the other —
// from the moment the executor finishes the stage's last weight gradient (overlapped with the rest of the pipeline)
// or all after the pipeline (serialized). finish() waits, in real time, for what the pipeline did not cover.
//
//   TimedGradSync sync({{0, 0.004}, {7, 0.006}}, /*overlap=*/true);
//   sync.start(now_us);  ... executor: sync.weights_done(7, t_us) ...  double extra_us = sync.finish(now_us);
#pragma once

#include <map>
#include <mutex>

namespace duplex {

class TimedGradSync {
public:
    TimedGradSync(std::map<int, double> seconds_by_stage, bool overlap)
        : seconds_(std::move(seconds_by_stage)), overlap_(overlap) {}
    void start(double now_us);
    // The executor finished stage `stage`'s last weight gradient of the step at now_us (any thread).
    void weights_done(int stage, double now_us);
    // After the pipeline, at now_us: sleeps until every stage's synchronization is done; returns the microseconds it
    // added to the step.
    double finish(double now_us);

private:
    std::map<int, double> seconds_;
    bool overlap_;
    std::mutex mu_;
    double busy_until_us_ = 0;  // the links' last synchronization ends here
    std::map<int, bool> done_;
};

}  // namespace duplex
