// The executor's expert-parallel service to a stage: the stage's EP group, and two lanes its exchanges run on, so
// it can compute something else (the shared experts) before waiting, and the wait goes through the call's
// StageContext, which decides what runs meanwhile — in a DualPipe F&B pair, the other half.
// Two lanes, one thread each (started at the first exchange): forward exchanges over the group's communicator,
// backward exchanges over a second communicator of the same ranks, so the two halves of an F&B pair never
// interleave collectives on one. A lane runs its exchanges in submission order, which is the order every rank of
// the group issues them, as collectives need.
//
//   ExpertService* ep = mb.ctx->experts();                       // null without expert parallelism
//   WorkPtr w = ep->submit(ExpertService::Forward, [&] { exchange.dispatch(x, dim, routing, routed); });
//   ... shared experts ...
//   mb.ctx->wait(w, "dispatch L3 mb 5");
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "comm/communicator.hpp"

namespace duplex {

class ExpertService {
public:
    enum Lane { Forward = 0, Backward = 1 };
    // `group`: the EP group (forward exchanges); `backward`: a communicator over the same ranks for backward
    // exchanges (null: `group` carries both, when no F&B pair can overlap them).
    ExpertService(std::shared_ptr<Communicator> group, std::shared_ptr<Communicator> backward = nullptr);
    ~ExpertService();  // runs what was submitted, then joins
    ExpertService(const ExpertService&) = delete;
    ExpertService& operator=(const ExpertService&) = delete;

    // The communicator of a lane's exchanges.
    const std::shared_ptr<Communicator>& group(Lane lane = Forward) const { return groups_[lane]; }

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
    std::shared_ptr<Communicator> groups_[2];
    LaneState lanes_[2];
};

}  // namespace duplex
