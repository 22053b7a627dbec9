// One background thread running posted jobs in order: the trainer's per-stage gradient reductions, started as the
// executor finishes each stage's last weight gradient and joined at the step end. wait() rethrows the first job's
// exception (the jobs after it are dropped).
//
//   SerialWorker w;
//   w.post([&] { optimizer.reduce(); });   // from the executor's thread
//   w.wait();                              // at the step end
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace duplex {

class SerialWorker {
public:
    SerialWorker();
    ~SerialWorker();  // finishes the queued jobs, then stops
    SerialWorker(const SerialWorker&) = delete;
    SerialWorker& operator=(const SerialWorker&) = delete;
    void post(std::function<void()> job);
    void wait();  // until every posted job ran; rethrows the first failure

private:
    void loop();
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::function<void()>> jobs_;
    int running_ = 0;
    bool stop_ = false;
    std::exception_ptr failed_;
    std::thread thread_;
};

}  // namespace duplex
