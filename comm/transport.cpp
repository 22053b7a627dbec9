#include "comm/transport.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

std::string size_mismatch_error(int sender, const std::string& sent, int receiver, size_t posted) {
    return fmt::format("message size mismatch: rank {} sent {} to rank {} which posted {} bytes", sender, sent, receiver,
                       posted);
}

bool Request::complete(std::string error) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (done_) return false;
        done_ = true;
        error_ = std::move(error);
    }
    cv_.notify_all();
    return true;
}

bool Request::done() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_;
}

bool Request::wait_until(const Deadline& deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (deadline.infinite()) {
        cv_.wait(lock, [&] { return done_; });
        return true;
    }
    return cv_.wait_until(lock, deadline.at(), [&] { return done_; });
}

std::string Request::error() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
}

void Request::rethrow() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_ && !error_.empty()) throw CommError(error_);
}

}  // namespace duplex
