#include "comm/transport.hpp"

#include <algorithm>
#include <cstdlib>
#include <new>
#include <utility>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

std::string size_mismatch_error(int sender, const std::string& sent, int receiver, size_t posted) {
    return fmt::format("message size mismatch: rank {} sent {} to rank {} which posted {} bytes", sender, sent, receiver,
                       posted);
}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
    if (this != &other) {
        if (release_ && data_) release_(data_);
        data_ = std::exchange(other.data_, nullptr);
        bytes_ = std::exchange(other.bytes_, 0);
        release_ = std::move(other.release_);
        other.release_ = nullptr;
    }
    return *this;
}

HostBuffer::~HostBuffer() {
    if (release_ && data_) release_(data_);
}

HostBuffer HostBufferPool::take(size_t bytes) {
    if (bytes == 0) return {};
    {
        std::lock_guard<std::mutex> lock(mutex_);
        auto best = free_.end();
        for (auto it = free_.begin(); it != free_.end(); ++it)
            if (it->size() >= bytes && (best == free_.end() || it->size() < best->size())) best = it;
        if (best != free_.end()) {
            HostBuffer b = std::move(*best);
            free_.erase(best);
            return b;
        }
    }
    return allocate_(bytes);
}

void HostBufferPool::give(HostBuffer buffer) {
    if (!buffer.data()) return;
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(buffer));
    if (free_.size() > kKeep)
        free_.erase(std::min_element(free_.begin(), free_.end(),
                                     [](const HostBuffer& a, const HostBuffer& b) { return a.size() < b.size(); }));
}

size_t HostBufferPool::free_buffers() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return free_.size();
}

HostBuffer Transport::allocate_host(size_t bytes) { return allocate_ordinary_host(bytes); }

namespace {

// Transport::post's default: the messages as requests of the transport, waited on in order.
class RequestBatch final : public MessageBatch {
public:
    RequestBatch(Transport& transport, std::vector<Message> messages)
        : MessageBatch(std::move(messages)), transport_(transport) {
        requests_.reserve(messages_.size());
        try {
            for (const Message& m : messages_)
                requests_.push_back(m.is_send ? transport.isend(m.peer, m.tag, m.buf, m.bytes)
                                              : transport.irecv(m.peer, m.tag, m.buf, m.bytes));
        } catch (...) {
            withdraw();  // what was posted before the failure (no destructor runs for a half-built batch)
            throw;
        }
    }
    ~RequestBatch() override { withdraw(); }

    int wait(const Deadline& deadline) override {
        for (size_t i = 0; i < requests_.size(); ++i) {
            bool arrived = transport_.wait(*requests_[i], deadline);
            if (arrived && !requests_[i]->failed()) continue;
            withdraw();
            if (arrived) requests_[i]->rethrow();
            return static_cast<int>(i);
        }
        return -1;
    }

private:
    void withdraw() {
        for (auto& r : requests_)
            if (!r->done()) transport_.cancel(*r);
    }

    Transport& transport_;
    std::vector<std::shared_ptr<Request>> requests_;
};

}  // namespace

std::unique_ptr<MessageBatch> Transport::post(std::vector<Message> messages) {
    return std::make_unique<RequestBatch>(*this, std::move(messages));
}

HostBuffer allocate_ordinary_host(size_t bytes) {
    constexpr size_t kPage = 4096;
    size_t rounded = (bytes + kPage - 1) / kPage * kPage;
    if (rounded == 0) return {};
    void* p = std::aligned_alloc(kPage, rounded);
    if (!p) throw std::bad_alloc();
    return HostBuffer(p, bytes, [](void* q) { std::free(q); });
}

bool Request::complete(std::string error) {
    uint8_t expected = kPending;
    if (!state_.compare_exchange_strong(expected, kCompleting)) return false;
    error_ = std::move(error);
    state_.store(kDone);  // error_ is final before done() says so
    if (waiters_.load() > 0) {
        std::lock_guard<std::mutex> lock(mutex_);  // a waiter between its check and its sleep finishes either first
        cv_.notify_all();
    }
    return true;
}

void Request::complete_unshared(std::string error) {
    error_ = std::move(error);
    state_.store(kDone, std::memory_order_release);
}

bool Request::done() const { return state_.load(std::memory_order_acquire) == kDone; }

bool Request::wait_until(const Deadline& deadline) {
    if (done()) return true;
    waiters_.fetch_add(1);
    std::unique_lock<std::mutex> lock(mutex_);
    bool arrived = true;
    if (deadline.infinite())
        cv_.wait(lock, [&] { return done(); });
    else
        arrived = cv_.wait_until(lock, deadline.at(), [&] { return done(); });
    waiters_.fetch_sub(1);
    return arrived;
}

std::string Request::error() const { return done() ? error_ : std::string(); }

void Request::rethrow() const {
    if (done() && !error_.empty()) throw CommError(error_);
}

}  // namespace duplex
