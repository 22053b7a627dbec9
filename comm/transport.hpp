// The point-to-point layer under every Communicator: a backend implements tagged, non-blocking send and
// receive between world ranks; collectives are written once on top (comm/communicator.cpp).
//
// A Request completes exactly once, successfully or with an error text; a backend's progress (the peer's
// thread for inproc, a progress thread for MPI and UCX) completes it while the caller computes.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
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
    bool done() const;
    // Waits until complete or the deadline; false at the deadline.
    bool wait_until(const Deadline& deadline);
    // Throws CommError if the request completed with an error.
    void rethrow() const;
    // The error it completed with ("" while pending or after success).
    std::string error() const;

private:
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    bool done_ = false;
    std::string error_;
};

// What both sides of a message report when the receive was posted with another size: "message size mismatch: rank
// 1 sent 128 bytes to rank 0 which posted 64 bytes" (sent: "128 bytes", "more bytes", "a plain message").
std::string size_mismatch_error(int sender, const std::string& sent, int receiver, size_t posted);

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
    // This rank gives up: requests of every rank that wait on it fail with a CommError naming it (where the
    // backend can reach them), and later calls here fail.
    virtual void abort(const std::string& reason) = 0;
    // The host names of all ranks of the world (for Topology), exchanged at bootstrap.
    virtual std::vector<std::string> hostnames() const = 0;
    // Whether `buf` is device memory (a backend that moves it); the Communicator's collectives, which copy and add
    // on the host, refuse it.
    virtual bool device_memory(const void* buf) const {
        (void)buf;
        return false;
    }
    // The backend and the choices it made at bootstrap, for headers and logs ("ucx (single copy with 7 of 7 ...)").
    virtual std::string describe() const { return name(); }
};

}  // namespace duplex
