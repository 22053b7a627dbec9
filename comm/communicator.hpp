// Communicator: a group of ranks over one Transport, with async point-to-point and collective calls.
// Every call returns a Work at once; the operation progresses in the background (collectives on a
// per-communicator progress thread, point-to-point in the transport) and Work::wait() rethrows a failure
// or raises TimeoutError naming the rank, the operation and the peer.
//
//   auto comm = ...;                                   // see comm/launch.hpp
//   auto w = comm->all_to_all_v(send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets);
//   compute();                                         // overlaps with the exchange
//   w->wait();
//   auto pp = comm->split(/*color=*/dp_index, /*key=*/stage);   // sub-communicator
//
// Collectives must be called in the same order on every member (as with MPI and NCCL).
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "comm/topology.hpp"
#include "comm/transport.hpp"
#include "core/clock.hpp"
#include "core/dtype.hpp"

namespace duplex {

struct CollectiveCtx;

enum class ReduceOp { Sum };

// User tags of isend/irecv must be below this (the rest of the wire tag carries the group and the kind).
constexpr uint32_t kMaxUserTag = 1u << 22;

struct LinkBytes {
    uint64_t intra_node = 0;
    uint64_t inter_node = 0;
};

class Work {
public:
    virtual ~Work() = default;
    // True once the operation has finished; rethrows its failure.
    virtual bool test() = 0;
    // Waits for the operation; timeout_s < 0 uses the communicator's timeout. Rethrows failures.
    virtual void wait(double timeout_s = -1) = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// Work finished by another thread (the communicator's worker, the expert service's lanes): finish() once, then
// test() and wait() from any thread see it; a failure passed to finish() is rethrown to every waiter.
class CompletableWork : public Work {
public:
    void finish(std::exception_ptr error = nullptr);
    bool test() override;

protected:
    // Blocks until finished, or until `deadline` passes (false then; an infinite deadline never does).
    bool wait_finished(const Deadline& deadline);

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    bool done_ = false;
    std::exception_ptr error_;
};

// Waits for every work in order; the first failure propagates.
void wait_all(const std::vector<WorkPtr>& works, double timeout_s = -1);

// DUPLEX_COMM_TIMEOUT: the seconds an operation of any backend waits for a peer by default.
double default_comm_timeout();

struct CommOptions {
    double timeout_s = -1;  // < 0: DUPLEX_COMM_TIMEOUT (default 300 s)
};

class Communicator : public std::enable_shared_from_this<Communicator> {
public:
    // The world communicator over a transport.
    static std::shared_ptr<Communicator> create(std::shared_ptr<Transport> transport, Topology topology,
                                                CommOptions options = {});
    ~Communicator();
    Communicator(const Communicator&) = delete;
    Communicator& operator=(const Communicator&) = delete;

    int rank() const { return rank_; }
    int size() const { return static_cast<int>(members_.size()); }
    int world_rank(int rank) const { return members_.at(rank); }
    const Topology& topology() const { return topology_; }  // of this group, in group ranks
    const char* backend() const { return transport_->name(); }
    std::string backend_description() const { return transport_->describe(); }
    double timeout_s() const { return timeout_s_; }

    // Host memory this communicator's backend moves fastest (Transport::allocate_host); any host buffer works.
    HostBuffer allocate_host(size_t bytes) const { return transport_->allocate_host(bytes); }
    // The backend's counters (Transport::counters), shared by every communicator over it.
    std::map<std::string, uint64_t> transport_counters() const { return transport_->counters(); }

    // Point-to-point buffers may be device memory where the backend moves it (nccl); collectives take host buffers.
    WorkPtr isend(const void* buf, size_t bytes, int peer, uint32_t tag);
    WorkPtr irecv(void* buf, size_t bytes, int peer, uint32_t tag);

    // Bytes and byte offsets per peer (size() entries each). Offsets let blocks sit anywhere in the buffers.
    WorkPtr all_to_all_v(const void* send, std::span<const size_t> send_bytes, std::span<const size_t> send_offsets,
                         void* recv, std::span<const size_t> recv_bytes, std::span<const size_t> recv_offsets);
    // Every rank sends `bytes_per_peer` to each peer; block p of `send` goes to rank p.
    WorkPtr all_to_all(const void* send, void* recv, size_t bytes_per_peer);
    // recv holds size() blocks of `bytes`, block p from rank p.
    WorkPtr all_gather(const void* send, void* recv, size_t bytes);
    // send holds size() blocks of `count` elements; recv gets the sum of block rank() over all ranks,
    // added in rank order (deterministic). bf16 sums accumulate in fp32 and round once.
    WorkPtr reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op = ReduceOp::Sum);
    // In place; any count (blocks need not divide evenly).
    WorkPtr all_reduce(void* buf, size_t count, DType dtype, ReduceOp op = ReduceOp::Sum);
    WorkPtr barrier();

    // Collective over this communicator: ranks with the same color form a new communicator, ordered by
    // (key, rank). A negative color returns nullptr (the rank joins no group).
    std::shared_ptr<Communicator> split(int color, int key);

    LinkBytes bytes_sent() const;
    void reset_counters();

    struct Worker;

private:
    Communicator(std::shared_ptr<Transport> transport, Topology world, std::vector<int> members, uint32_t context,
                 double timeout_s);
    uint64_t wire_tag(bool collective, uint32_t tag) const;
    WorkPtr enqueue(const char* op, std::function<void(const CollectiveCtx&)> body);
    // An exchange of blocks (all_to_all, all_to_all_v): `layout` holds send bytes, send offsets, receive bytes and
    // receive offsets per peer, one list after the other.
    WorkPtr enqueue_exchange(const char* op, const void* send, void* recv, std::vector<size_t> layout);
    void count_send(int peer, size_t bytes);
    // ConfigError when the transport says a buffer is device memory (the collectives work on the host).
    void check_host_buffers(const char* op, const void* send, const void* recv) const;

    std::shared_ptr<Transport> transport_;
    Topology world_topology_;
    Topology topology_;
    std::vector<int> members_;  // group rank -> world rank
    int rank_ = 0;
    uint32_t context_;
    double timeout_s_;
    uint32_t collective_seq_ = 0;
    uint32_t split_seq_ = 0;
    std::array<std::atomic<uint64_t>, 3> sent_bytes_{};
    std::shared_ptr<Worker> worker_;
    friend struct CollectiveCtx;
};

// Element-wise dst += src for `count` elements (the one reduction used by the collectives).
void reduce_sum_into(void* dst, const void* src, size_t count, DType dtype);

}  // namespace duplex

namespace duplex {

// Collects one byte string from every rank on `root` (index = rank); other ranks get an empty list.
// Collective: every rank calls it.
std::vector<std::string> gather_strings(Communicator& comm, const std::string& mine, int root = 0);

}  // namespace duplex
