// The executor's expert-exchange service: a stage hands it an expert dispatch or combine and gets a Work back,
// so it can compute something else (the shared experts) before waiting, and the wait goes through the
// executor (wait_in_stage), which decides what runs meanwhile — in a DualPipe F&B pair, the other half.
// Two lanes, one thread each: forward exchanges (the EP group's communicator) and backward exchanges (its
// second communicator). A lane runs its exchanges in submission order, which is the order every rank of the
// group issues them, as collectives need.
//
//   WorkPtr w = service.submit(ExpertService::Forward, [&] { exchange.dispatch(x, dim, routing, routed); });
//   ... shared experts ...
//   wait_in_stage(w, "dispatch L3 mb 5");
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "comm/communicator.hpp"

namespace duplex {

class ExpertService {
public:
    enum Lane { Forward = 0, Backward = 1 };
    ExpertService();
    ~ExpertService();  // runs what was submitted, then joins
    ExpertService(const ExpertService&) = delete;
    ExpertService& operator=(const ExpertService&) = delete;

    // Runs fn on the lane's thread after everything submitted there before; the Work completes when fn returns
    // and rethrows what fn threw.
    WorkPtr submit(Lane lane, std::function<void()> fn);

private:
    struct Task;
    struct LaneState {
        std::mutex mutex;
        std::condition_variable cv;
        std::deque<std::shared_ptr<Task>> queue;
        bool stop = false;
        std::thread thread;
    };
    void loop(LaneState& l);
    LaneState lanes_[2];
};

}  // namespace duplex
