#include "runtime/train/serial_worker.hpp"

namespace duplex {

SerialWorker::SerialWorker() : thread_([this] { loop(); }) {}

SerialWorker::~SerialWorker() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
}

void SerialWorker::post(std::function<void()> job) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        jobs_.push_back(std::move(job));
    }
    cv_.notify_all();
}

void SerialWorker::wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return jobs_.empty() && running_ == 0; });
    if (failed_) {
        std::exception_ptr e = failed_;
        failed_ = nullptr;
        std::rethrow_exception(e);
    }
}

void SerialWorker::loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
        cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stop_ and nothing left
        std::function<void()> job = std::move(jobs_.front());
        jobs_.pop_front();
        if (failed_) {  // after a failure the rest are dropped
            cv_.notify_all();
            continue;
        }
        ++running_;
        lock.unlock();
        try {
            job();
        } catch (...) {
            lock.lock();
            failed_ = std::current_exception();
            --running_;
            cv_.notify_all();
            continue;
        }
        lock.lock();
        --running_;
        cv_.notify_all();
    }
}

}  // namespace duplex
