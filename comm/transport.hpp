// The point-to-point layer under every Communicator: a backend implements tagged, non-blocking send and
// receive between world ranks; collectives are written once on top (comm/communicator.cpp).
//
// A Request completes exactly once, successfully or with an error text; a backend's progress (the peer's
// thread for inproc, a progress thread for MPI and UCX) completes it while the caller computes.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "core/clock.hpp"

namespace duplex {

class Request {
public:
    Request(int peer, uint64_t tag, size_t bytes, bool is_send) : peer(peer), tag(tag), bytes(bytes), is_send(is_send) {}
    virtual ~Request() = default;

    const int peer;
    const uint64_t tag;
    const size_t bytes;
    const bool is_send;

    // Marks the request complete; a non-empty error makes wait()/test() throw CommError with it.
    // Returns false if it had already completed.
    bool complete(std::string error = {});
    // complete() for a request no other thread has seen yet (finished inside the call that posted it): no waiter can
    // exist, so no fence (which would wait for the message's own stores to shared memory to drain).
    void complete_unshared(std::string error = {});
    bool done() const;
    // Waits until complete or the deadline; false at the deadline.
    bool wait_until(const Deadline& deadline);
    // Throws CommError if the request completed with an error.
    void rethrow() const;
    // The error it completed with ("" while pending or after success).
    std::string error() const;
    // Completed with an error (no copy of its text).
    bool failed() const { return done() && !error_.empty(); }

private:
    // NOTE: completing takes no lock (a message's completion is on its latency path): the first complete() claims
    // state_ (kPending -> kCompleting), writes error_, then publishes kDone; done() is one atomic load. The mutex and
    // condition variable serve wait_until only, and complete() touches them only when a waiter announced itself in
    // waiters_ (it increments before checking done(), complete() publishes before reading it: one sees the other).
    enum : uint8_t { kPending, kCompleting, kDone };
    std::atomic<uint8_t> state_{kPending};
    std::atomic<int> waiters_{0};
    std::mutex mutex_;
    std::condition_variable cv_;
    std::string error_;
};

// What both sides of a message report when the receive was posted with another size: "message size mismatch: rank
// 1 sent 128 bytes to rank 0 which posted 64 bytes" (sent: "128 bytes", "more bytes", "a plain message").
std::string size_mismatch_error(int sender, const std::string& sent, int receiver, size_t posted);

// One message of a MessageBatch: a send from `buf` or a receive into it, posted as isend/irecv would.
struct Message {
    int peer;  // world rank
    uint64_t tag;
    void* buf;  // read only by a send
    size_t bytes;
    bool is_send;
};

// Messages posted together and waited on together: a collective's round (Transport::post). Destroying a batch
// before wait() returned withdraws what is still in flight.
class MessageBatch {
public:
    explicit MessageBatch(std::vector<Message> messages) : messages_(std::move(messages)) {}
    virtual ~MessageBatch() = default;
    const std::vector<Message>& messages() const { return messages_; }
    // Waits for every message until the deadline. Returns -1 when all completed, else the index of the first message
    // that had not (every message withdrawn, its buffer free, when it returns). A failed message: the others are
    // withdrawn, then its CommError is thrown.
    virtual int wait(const Deadline& deadline) = 0;

protected:
    std::vector<Message> messages_;
};

// Host memory from Transport::allocate_host: move-only, handed back to its allocator when destroyed.
class HostBuffer {
public:
    HostBuffer() = default;
    HostBuffer(void* data, size_t bytes, std::function<void(void*)> release)
        : data_(data), bytes_(bytes), release_(std::move(release)) {}
    HostBuffer(HostBuffer&& other) noexcept { *this = std::move(other); }
    HostBuffer& operator=(HostBuffer&& other) noexcept;
    HostBuffer(const HostBuffer&) = delete;
    HostBuffer& operator=(const HostBuffer&) = delete;
    ~HostBuffer();

    void* data() const { return data_; }
    size_t size() const { return bytes_; }
    // The buffer as elements of T (size() / sizeof(T) of them).
    template <typename T>
    std::span<T> as() const {
        return {static_cast<T*>(data_), bytes_ / sizeof(T)};
    }

private:
    void* data_ = nullptr;
    size_t bytes_ = 0;
    std::function<void(void*)> release_;
};

// Host buffers reused across operations: take() hands out a free one of at least `bytes` (the smallest that fits) or
// a new one from `allocate`, give() takes it back for the next take(); at most kKeep stay free (the largest).
// Thread-safe. Keeps an allocator's buffers (UCX: pages its peers map) from being allocated and faulted in per call.
class HostBufferPool {
public:
    static constexpr size_t kKeep = 8;
    explicit HostBufferPool(std::function<HostBuffer(size_t)> allocate) : allocate_(std::move(allocate)) {}
    HostBuffer take(size_t bytes);
    void give(HostBuffer buffer);
    size_t free_buffers() const;

private:
    std::function<HostBuffer(size_t)> allocate_;
    mutable std::mutex mutex_;
    std::vector<HostBuffer> free_;
};

// Page-aligned memory from the system allocator (what Transport::allocate_host gives by default).
HostBuffer allocate_ordinary_host(size_t bytes);

class Transport {
public:
    virtual ~Transport() = default;
    virtual const char* name() const = 0;
    virtual int rank() const = 0;  // world rank
    virtual int size() const = 0;  // world size

    // Non-blocking tagged send/receive. Messages between a pair of ranks with the same tag match in order.
    // The receive must be posted with exactly the sent size (a mismatch fails both sides).
    virtual std::shared_ptr<Request> isend(int peer, uint64_t tag, const void* buf, size_t bytes) = 0;
    virtual std::shared_ptr<Request> irecv(int peer, uint64_t tag, void* buf, size_t bytes) = 0;
    // Waits for a request until the deadline (false then). Backends whose progress the caller can drive
    // (UCX) do so here instead of sleeping, saving a thread hand-off per message.
    virtual bool wait(Request& request, const Deadline& deadline) { return request.wait_until(deadline); }
    // Withdraws a request that has not completed (after a timeout); when it returns the buffer is free.
    virtual void cancel(Request& request) = 0;
    // Posts `messages` in their order. The default posts each with isend/irecv and waits on them one by one; a
    // backend that waits on many at once cheaper (MPI: one array of its requests, tested together, none of them
    // listed for the progress thread) overrides it.
    virtual std::unique_ptr<MessageBatch> post(std::vector<Message> messages);
    // This rank gives up: requests of every rank that wait on it fail with a CommError naming it (where the
    // backend can reach them), and later calls here fail.
    virtual void abort(const std::string& reason) = 0;
    // The launch that made this transport is over (every rank got here): meet the other ranks once more, as tearing
    // down needs, and fail later operations. For a transport that outlives its launch (a framework keeping a
    // communicator until its interpreter exits): its destructor then runs without the peers. Default: nothing.
    virtual void close() {}
    // The host names of all ranks of the world (for Topology), exchanged at bootstrap.
    virtual std::vector<std::string> hostnames() const = 0;
    // Whether `buf` is device memory (a backend that moves it); the Communicator's collectives, which copy and add
    // on the host, refuse it.
    virtual bool device_memory(const void* buf) const {
        (void)buf;
        return false;
    }
    // Page-aligned host memory this backend moves fastest: the UCX backend's comes from a shared arena that the
    // other ranks of the host map, so a large message from it is a single memcpy by the receiver. Any host
    // memory works as a buffer; this is only faster. The default is ordinary page-aligned memory.
    virtual HostBuffer allocate_host(size_t bytes);
    // What the backend has counted since it started, by name (UCX: how its single-copy messages were copied); empty
    // where it counts nothing.
    virtual std::map<std::string, uint64_t> counters() const { return {}; }
    // The backend and the choices it made at bootstrap, for headers and logs ("ucx (single copy with 7 of 7 ...)").
    virtual std::string describe() const { return name(); }
};

}  // namespace duplex
