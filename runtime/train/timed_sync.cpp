#include "runtime/train/timed_sync.hpp"

#include <algorithm>
#include <chrono>
#include <thread>

namespace duplex {

void TimedGradSync::start(double now_us) {
    std::lock_guard<std::mutex> lock(mu_);
    busy_until_us_ = now_us;
    done_.clear();
}

void TimedGradSync::weights_done(int stage, double now_us) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = seconds_.find(stage);
    if (!overlap_ || it == seconds_.end() || done_[stage]) return;
    done_[stage] = true;
    busy_until_us_ = std::max(busy_until_us_, now_us) + it->second * 1e6;
}

double TimedGradSync::finish(double now_us) {
    double until = 0;
    {
        std::lock_guard<std::mutex> lock(mu_);
        until = std::max(busy_until_us_, now_us);
        for (auto& [stage, s] : seconds_)  // serialized, or a stage whose last weight gradient was not reported
            if (!done_[stage]) until += s * 1e6;
    }
    double extra = until - now_us;
    if (extra > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(extra));
    return extra;
}

}  // namespace duplex
