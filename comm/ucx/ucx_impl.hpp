// The UCX transport's private parts (comm/ucx/ucx_transport.hpp is its public face), shared by the files that
// implement it: ucx_transport.cpp (bootstrap, posting, completion, progress, failure) and ucx_single_copy.cpp (the
// single copy between ranks of one host: offers, reads, the shared arena, the agreement on who may read whom).
#pragma once

#include <poll.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "comm/in_flight.hpp"
#include "comm/progress_gate.hpp"
#include "comm/shared_arena.hpp"
#include "comm/store.hpp"
#include "comm/topology.hpp"
#include "comm/transport.hpp"
#include "core/error.hpp"
#include "core/host_memory.hpp"
#include "core/knobs.hpp"
#include "core/log.hpp"

#define DUPLEX_UCX_CHECK(call)                                                                           \
    do {                                                                                                 \
        ucs_status_t duplex_ucx_st_ = (call);                                                            \
        if (duplex_ucx_st_ != UCS_OK)                                                                    \
            ::duplex::throw_api_error("UCX", #call, duplex_ucx_st_, ucs_status_string(duplex_ucx_st_), __FILE__, \
                                      __LINE__);                                                         \
    } while (0)

namespace duplex::ucx_detail {

// NOTE: a dead peer must fail the survivors with an error naming it, never abort them. UCX's peer error handling
// would do that but keeps UCX to TCP on one node (shared memory cannot report a dead peer in UCX 1.13): 2-4x slower
// all-to-all. Without it, UCX's own CMA copy from a process that just died is fatal inside UCX. So by default UCX
// runs without peer error handling and without CMA (its shared-memory FIFOs carry small messages), and messages of
// at least DUPLEX_UCX_CMA_MIN bytes between ranks of one host take Duplex's own single copy: the sender posts a
// 32-byte offer (pid, address, size), the receiver reads the bytes with process_vm_readv (ESRCH for a dead sender:
// an error naming it) and answers with 16 bytes; a dead receiver is named by the store's watchdog (comm/launch.cpp).
// A buffer from allocate_host lives in this rank's shared arena, which the host's other ranks map: its offer carries
// the offset, and the receiver copies with memcpy out of its mapping (process_vm_readv pins every page it copies,
// several times slower per byte). BENCHMARKS.md has the numbers (scripts/bench-ucx-default).

// UCX tag: bit 63 marks a single-copy answer, bits 49..62 carry the sender's rank, below them the wire tag.
constexpr int kSourceShift = 49;
constexpr int kMaxRanks = 1 << 14;
constexpr uint64_t kWireMask = (uint64_t(1) << kSourceShift) - 1;
constexpr uint64_t kAnswerBit = uint64_t(1) << 63;

// Waiting threads and the progress thread yield-spin this long after the last progress before sleeping:
// oversubscribed ranks get the core back and a message that arrives soon is still seen within microseconds
// (0 and 20 us were tried: no measurable change, BENCHMARKS.md).
constexpr double kSpinBeforeSleep_s = 200e-6;
// A waiting thread then polls the worker, sleeping between polls from kMinPollSleep_s up to kMaxPollSleep_s: a
// message is seen within that long, at a few thousand wake-ups a second.
constexpr double kMinPollSleep_s = 10e-6;
constexpr double kMaxPollSleep_s = 100e-6;
// A waiting thread reads the clock (its deadline, how long it has been quiet) once per this many polls of the worker.
constexpr unsigned kPollsPerClock = 8;
// With no more ranks than cores on the host, a waiting thread polls this many times before its first yield: a
// yield is a system call that returns at once when nothing else wants the core, and a message arriving during it
// is seen that much later (Open MPI spins there too; with more ranks than cores it yields at every empty poll).
constexpr unsigned kSpinPolls = 64;

constexpr uint64_t kOfferMagic = 0x4450'4C58'434D'4131ull;  // "DPLXCMA1": address is in the sender's memory
constexpr uint64_t kMappedMagic = 0x4450'4C58'4D41'5031ull;  // "DPLXMAP1": address is an offset in its arena

// Single copy: the sender's offer (where the bytes are), the receiver's answer once it has read them. The receiver
// copies out of its mapping of the sender's arena (kMappedMagic) or reads the sender's memory (kOfferMagic).
struct CmaOffer {
    uint64_t magic = kOfferMagic;
    uint64_t pid = 0;
    uint64_t address = 0;
    uint64_t bytes = 0;
};
struct CmaAnswer {
    int64_t status = 0;   // 0: read; kAnswerMismatch: the receive was posted with another size; else an errno
    uint64_t posted = 0;  // the size the receiver posted
};
constexpr int64_t kAnswerMismatch = -1;

// What an internal UCX operation does for the user's request it serves (its parent).
enum class Part : uint8_t { User, OfferSend, OfferRecv, AnswerSend, AnswerRecv };

struct UcxRequest : Request, InFlightLinks<UcxRequest> {
    using Request::Request;
    void* handle = nullptr;  // UCX's request while in flight
    class UcxTransport* owner = nullptr;
    Part part = Part::User;
    std::shared_ptr<UcxRequest> parent;              // internal parts: the user's request
    std::vector<std::weak_ptr<UcxRequest>> parts;    // a single-copy user request: its internal parts
    void* destination = nullptr;                     // a single-copy receive: the user's buffer
    CmaOffer offer;                                  // OfferSend / OfferRecv: the wire bytes
    CmaAnswer answer;                                // AnswerSend / AnswerRecv: the wire bytes
};

// The transport's knobs (defined in ucx_transport.cpp, with their help texts).
extern const Knob<bool> kUcxPeerErrors;
extern const Knob<long> kCmaMin;
extern const Knob<std::string> kArena;

class UcxTransport : public Transport {
public:
    UcxTransport(std::shared_ptr<Store> store, int rank, int size);
    ~UcxTransport() override;

    const char* name() const override { return "ucx"; }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    std::vector<std::string> hostnames() const override { return hostnames_; }
    std::string describe() const override;

    std::map<std::string, uint64_t> counters() const override {
        return {{"single_copy_mapped", mapped_copies_.load()}, {"single_copy_read", remote_reads_.load()}};
    }

    HostBuffer allocate_host(size_t bytes) override;

    std::shared_ptr<Request> isend(int peer, uint64_t tag, const void* buf, size_t bytes) override;

    std::shared_ptr<Request> irecv(int peer, uint64_t tag, void* buf, size_t bytes) override;

    bool wait(Request& request, const Deadline& deadline) override;

    void cancel(Request& request) override;

    void close() override;

    void abort(const std::string& reason) override {
        std::string why = fmt::format("rank {} failed: {}", rank_, reason);
        try {
            store_->set("ucx/abort", why);
        } catch (const Error&) {
        }
        fail_all(why);
    }

private:
    // A user request's internal operation (single copy).
    std::shared_ptr<UcxRequest> make_part(const std::shared_ptr<UcxRequest>& user, Part part, bool is_send) {
        size_t bytes = part == Part::OfferSend || part == Part::OfferRecv ? sizeof(CmaOffer) : sizeof(CmaAnswer);
        auto r = std::make_shared<UcxRequest>(user->peer, user->tag, bytes, is_send);
        r->part = part;
        r->parent = user;
        user->parts.push_back(r);
        return r;
    }

    // Registers a request as in flight (fail_all and the destructor reach it there).
    void track(const std::shared_ptr<UcxRequest>& req) {
        req->owner = this;
        std::lock_guard<std::mutex> slock(state_mutex_);
        in_flight_.add(req);
    }

    // Posts one UCX operation for req (ucx_mutex_ held); call(params) makes the UCX call. A user's plain send may
    // complete inside the call (a small message copied out): then it is never tracked, and no callback comes.
    // Receives and internal parts always complete through their callback. (UCX 1.13 reports no length for a receive
    // that completes inside the call, so its size could not be checked.)
    template <typename Call>
    void post_locked(const std::shared_ptr<UcxRequest>& req, Call&& call) {
        req->owner = this;
        bool may_finish_here = req->part == Part::User && req->is_send;
        if (!may_finish_here) track(req);
        ucp_request_param_t p{};
        p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
        if (!may_finish_here) p.op_attr_mask |= UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        if (req->is_send)
            p.cb.send = &UcxTransport::on_send;
        else
            p.cb.recv = &UcxTransport::on_recv;
        p.user_data = req.get();
        // NOTE: with UCP_OP_ATTR_FLAG_NO_IMM_CMPL, UCX may run the completion callback inside this call, before it
        // returns the handle.
        ucs_status_ptr_t h = call(&p);
        if (may_finish_here && !UCS_PTR_IS_PTR(h)) {
            req->complete_unshared(completion_error(*req, UCS_PTR_STATUS(h), req->bytes));
            return;
        }
        if (UCS_PTR_IS_ERR(h)) {
            settle(*req, completion_error(*req, UCS_PTR_STATUS(h), 0));
            return;
        }
        if (may_finish_here) track(req);  // before any progress call can run its callback (ucx_mutex_ is held)
        if (!req->done()) req->handle = h;
    }

    // What a finished operation failed with ("" for success): a cancel, a size that differs from the posted one, an
    // error of UCX.
    std::string completion_error(const UcxRequest& r, ucs_status_t status, size_t received) const;

    // After posting req (ucx_mutex_ released): the progress thread looks within ProgressGate::kNapMax (a waiting caller
    // drives the worker itself).
    void posted(const Request& req) {
        if (req.done()) return;
        gate_.posted();
        wake();
    }

    // Completes a request (ucx_mutex_ held) and carries the outcome of an internal part to its user request: an
    // error fails it; an answer completes a single-copy send; an offer is queued for reading.
    void settle(UcxRequest& r, std::string error);

    // Progress, then the single-copy reads its offers asked for (ucx_mutex_ held).
    unsigned progress_locked() {
        unsigned n = ucp_worker_progress(worker_);
        std::vector<std::shared_ptr<UcxRequest>> ready;
        ready.swap(offers_);
        for (auto& offer : ready) read_offer(*offer);
        return n + unsigned(ready.size());
    }

    // Reads the bytes an offer points at into the user's buffer, then answers the sender.
    void read_offer(UcxRequest& offer);

    // process_vm_readv in pieces (one call moves at most about 2 GiB); 0 or the errno.
    static int read_remote(pid_t pid, uint64_t address, void* into, size_t bytes);

    bool single_copy(int peer, size_t bytes) const {
        return cma_min_ > 0 && bytes >= static_cast<size_t>(cma_min_) && peer != rank_ && cma_peer_[peer];
    }

    // Every rank reads a word from each rank of its host (process_vm_readv) and says whether it could; a pair uses
    // single copy only when both could, so both sides of a message agree on its protocol.
    void agree_on_single_copy();

    // The arena allocate_host hands out; its header page holds the probe word, so the ranks that map it check that they
    // see this process's pages. Without it (off, or the system refuses) buffers are ordinary memory.
    void open_arena();

    bool in_flight_empty() {
        std::lock_guard<std::mutex> lock(state_mutex_);
        return in_flight_.empty();
    }

    bool failed(Request& req) {
        if (!aborted_) return false;
        std::lock_guard<std::mutex> lock(state_mutex_);
        req.complete(abort_reason_);
        return true;
    }

    // Interrupts the progress thread's poll(); a system call, so only when it may be sleeping there.
    void wake() {
        if (!polling_.load()) return;
        std::lock_guard<std::mutex> lock(ucx_mutex_);
        ucp_worker_signal(worker_);
    }

    // Called inside ucp_worker_progress, with ucx_mutex_ held.
    void finish(UcxRequest* r, void* ucx_request, ucs_status_t status, size_t received);

    static void on_send(void* ucx_request, ucs_status_t status, void* user) {
        auto r = static_cast<UcxRequest*>(user);
        r->owner->finish(r, ucx_request, status, r->bytes);
    }
    static void on_recv(void* ucx_request, ucs_status_t status, const ucp_tag_recv_info_t* info, void* user) {
        auto r = static_cast<UcxRequest*>(user);
        r->owner->finish(r, ucx_request, status, info ? info->length : 0);
    }

    struct PeerRef {
        UcxTransport* self = nullptr;
        int peer = 0;
    };
    // Called inside ucp_worker_progress (ucx_mutex_ held) when an endpoint's peer is unreachable.
    static void on_peer_error(void* arg, ucp_ep_h, ucs_status_t status) {
        auto ref = static_cast<PeerRef*>(arg);
        ref->self->fail_all(fmt::format("rank {}: lost rank {} (UCX: {})", ref->self->rank_, ref->peer,
                                        ucs_status_string(status)),
                            /*worker_locked=*/true);
    }

    // Fails every operation in flight with the first abort reason. What UCX still holds is cancelled first, so no
    // late message lands in a buffer its owner frees once its wait() has failed. worker_locked: called from inside
    // ucp_worker_progress (a UCX callback), where the worker is ours already.
    void fail_all(const std::string& why, bool worker_locked = false);

    // Drives the worker while anything is in flight; sleeps on the condition variable otherwise, and on the
    // worker's event descriptor when a progress round found nothing to do.
    void progress_loop();

    std::shared_ptr<Store> store_;
    int rank_, size_;
    ucp_context_h context_ = nullptr;
    ucp_worker_h worker_ = nullptr;
    int efd_ = -1;
    std::vector<ucp_ep_h> endpoints_;
    std::vector<PeerRef> peers_;  // error-handler arguments, one per endpoint
    bool peer_errors_ = false;    // UCX's peer failure mode (TCP on one host)
    bool shared_memory_only_ = false;  // every rank on this host: TCP left out of UCX's transports
    bool oversubscribed_ = false;      // more ranks on this host than cores
    std::vector<bool> cma_peer_;  // single copy with this rank (same host, both can read each other)
    long cma_min_ = 0;            // single copy from this many bytes (0: never)
    uint64_t cma_probe_ = 0;      // the word the other ranks of this host read to test single copy
    std::shared_ptr<SharedArena> arena_;                     // allocate_host's memory (null: off)
    std::vector<std::unique_ptr<MappedArena>> peer_arena_;  // the arenas of the host's ranks, mapped here
    std::vector<bool> map_to_;                               // the rank maps this rank's arena
    std::atomic<bool> arena_full_logged_{false};
    std::atomic<uint64_t> mapped_copies_{0}, remote_reads_{0};  // single-copy receives, by how they were copied
    std::vector<std::shared_ptr<UcxRequest>> offers_;  // offers received, read after the progress call (ucx_mutex_)
    std::vector<std::string> hostnames_;
    std::mutex ucx_mutex_;    // serializes every UCX call
    std::mutex state_mutex_;  // guards in_flight_, stopping_, abort state
    ProgressGate gate_;  // the progress thread's waits (with state_mutex_)
    InFlight<UcxRequest> in_flight_;
    bool stopping_ = false;
    std::atomic<bool> aborted_{false};
    bool closed_ = false;  // close() ran: the shutdown barrier is behind us
    std::mutex copy_mutex_;  // held while a single-copy receive fills its buffer, and while fail_all completes requests
    std::atomic<bool> polling_{false};  // the progress thread may be asleep in poll()
    std::string abort_reason_;
    std::thread progress_;
};

}  // namespace duplex::ucx_detail
