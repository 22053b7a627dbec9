#include "runtime/exec/expert_service.hpp"

#include "core/error.hpp"

namespace duplex {

struct ExpertService::Task : public CompletableWork {
    std::function<void()> fn;

    // NOTE: no deadline of its own: the exchange's collectives have theirs, and their TimeoutError names the peer.
    void wait(double) override { wait_finished(Deadline(0)); }
};

ExpertService::ExpertService(std::shared_ptr<Communicator> group, std::shared_ptr<Communicator> backward)
    : groups_{group, backward ? backward : group} {
    DUPLEX_CHECK_ARG(groups_[0] && groups_[1]->size() == groups_[0]->size(), "expert service",
                     "needs the EP group's communicator and a backward one of the same size");
}

ExpertService::~ExpertService() {
    for (LaneState& l : lanes_) {
        {
            std::lock_guard<std::mutex> lock(l.mutex);
            l.stop = true;
        }
        l.cv.notify_all();
    }
    for (LaneState& l : lanes_)
        if (l.thread.joinable()) l.thread.join();
}

WorkPtr ExpertService::submit(Lane lane, std::function<void()> fn) {
    auto t = std::make_shared<Task>();
    t->fn = std::move(fn);
    LaneState& l = lanes_[lane];
    {
        std::lock_guard<std::mutex> lock(l.mutex);
        if (!l.thread.joinable()) l.thread = std::thread([this, &l] { loop(l); });
        l.queue.push_back(t);
    }
    l.cv.notify_one();
    return t;
}

void ExpertService::loop(LaneState& l) {
    for (;;) {
        std::shared_ptr<Task> t;
        {
            std::unique_lock<std::mutex> lock(l.mutex);
            l.cv.wait(lock, [&] { return l.stop || !l.queue.empty(); });
            if (l.queue.empty()) return;
            t = std::move(l.queue.front());
            l.queue.pop_front();
        }
        try {
            t->fn();
            t->finish(nullptr);
        } catch (...) {
            t->finish(std::current_exception());
        }
        t->fn = nullptr;  // release what the exchange captured before the waiter moves on
    }
}

}  // namespace duplex
