#include "comm/ucx/ucx_transport.hpp"

#include <poll.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "comm/shared_arena.hpp"
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

namespace duplex {

namespace {

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
const Knob<bool> kUcxPeerErrors("DUPLEX_UCX_PEER_ERRORS", false,
                                "0 (default): UCX's shared-memory FIFOs for small same-host messages, Duplex's single "
                                "copy for large ones (DUPLEX_UCX_CMA_MIN), a lost rank named by the store's watchdog "
                                "or by the failed read of its memory; 1: UCX's peer error handling as well (UCX then "
                                "keeps to TCP on one node: small messages several times slower)");
const Knob<long> kCmaMin("DUPLEX_UCX_CMA_MIN", 64 * 1024,
                         "messages of at least this many bytes between ranks of one host are copied once by the "
                         "receiver, out of its mapping of the sender's shared arena (buffers from allocate_host) or "
                         "with process_vm_readv (any other memory); 0 turns this off (every "
                         "byte through UCX, whose own CMA then stays on). Used only where every rank of the host can "
                         "read the others' memory");
const Knob<std::string> kArena("DUPLEX_UCX_ARENA", "64G",
                               "address space of the shared arena that allocate_host hands out (K/M/G; 0: off): "
                               "single-copy messages from it are one memcpy out of the receiver's mapping of the "
                               "sender's pages instead of a process_vm_readv; pages exist only once written");

// UCX tag: bit 63 marks a single-copy answer, bits 49..62 carry the sender's rank, below them the wire tag.
constexpr int kSourceShift = 49;
constexpr int kMaxRanks = 1 << 14;
constexpr uint64_t kWireMask = (uint64_t(1) << kSourceShift) - 1;
constexpr uint64_t kAnswerBit = uint64_t(1) << 63;

// Waiting threads and the progress thread yield-spin this long after the last progress before sleeping:
// oversubscribed ranks get the core back and a message that arrives soon is still seen within microseconds
// (0 and 20 us were tried: no measurable change, BENCHMARKS.md).
constexpr double kSpinBeforeSleep_s = 200e-6;

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

struct UcxRequest : Request {
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

class UcxTransport : public Transport {
public:
    UcxTransport(std::shared_ptr<Store> store, int rank, int size) : store_(std::move(store)), rank_(rank), size_(size) {
        if (size > kMaxRanks)
            throw ConfigError("world size", fmt::format("UCX backend supports up to {} ranks, got {}", kMaxRanks, size));
        ucp_config_t* config = nullptr;
        DUPLEX_UCX_CHECK(ucp_config_read(nullptr, nullptr, &config));
        peer_errors_ = kUcxPeerErrors.get();
        cma_min_ = kCmaMin.get();
        if (cma_min_ < 0) {
            ucp_config_release(config);
            throw ConfigError(kCmaMin.name(), fmt::format("must be 0 (off) or a size in bytes, got {}", cma_min_));
        }
        if (!peer_errors_ && cma_min_ > 0 && !std::getenv("UCX_TLS")) {
            // UCX's own CMA copy aborts the process when the peer just died; Duplex's single copy takes those
            // messages instead and fails with an error naming the rank.
            DUPLEX_UCX_CHECK(ucp_config_modify(config, "TLS", "^cma"));
            // Without CMA, UCX's rendezvous on one host is a chain of bounce-buffer fragments (4x the time of an
            // eager send at 32 KiB here): below the single-copy size, eager it is (on every link: UCX 1.13 has one
            // threshold for all).
            if (!std::getenv("UCX_RNDV_THRESH"))
                DUPLEX_UCX_CHECK(ucp_config_modify(config, "RNDV_THRESH", std::to_string(cma_min_).c_str()));
        }
        ucp_params_t params{};
        params.field_mask = UCP_PARAM_FIELD_FEATURES;
        params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
        ucs_status_t st = ucp_init(&params, config, &context_);
        ucp_config_release(config);
        DUPLEX_UCX_CHECK(st);
        ucp_worker_params_t wparams{};
        wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
        wparams.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // every call below holds ucx_mutex_
        DUPLEX_UCX_CHECK(ucp_worker_create(context_, &wparams, &worker_));
        DUPLEX_UCX_CHECK(ucp_worker_get_efd(worker_, &efd_));

        ucp_address_t* address = nullptr;
        size_t address_len = 0;
        DUPLEX_UCX_CHECK(ucp_worker_get_address(worker_, &address, &address_len));
        char host[256] = {};
        gethostname(host, sizeof(host) - 1);
        store_->set(fmt::format("ucx/addr/{}", rank_), std::string(reinterpret_cast<char*>(address), address_len));
        store_->set(fmt::format("ucx/host/{}", rank_), host);
        ucp_worker_release_address(worker_, address);

        endpoints_.resize(size_, nullptr);
        peers_.resize(size_);
        for (int r = 0; r < size_; ++r) {
            std::string a = store_->get(fmt::format("ucx/addr/{}", r), 120.0);
            hostnames_.push_back(store_->get(fmt::format("ucx/host/{}", r), 120.0));
            ucp_ep_params_t ep{};
            ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
            ep.address = reinterpret_cast<const ucp_address_t*>(a.data());
            if (peer_errors_) {
                // A peer that dies fails this rank's operations naming it, instead of UCX aborting the process.
                ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
                ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
                peers_[r] = {this, r};
                ep.err_handler.cb = on_peer_error;
                ep.err_handler.arg = &peers_[r];
            }
            DUPLEX_UCX_CHECK(ucp_ep_create(worker_, &ep, &endpoints_[r]));
        }
        if (cma_min_ > 0) open_arena();
        agree_on_single_copy();
        progress_ = std::thread([this] { progress_loop(); });
        log::debug("comm", "rank {}: UCX worker ready with {} endpoints", rank_, size_);
    }

    ~UcxTransport() override {
        // Every rank stops sending before anyone closes endpoints.
        try {
            int64_t arrived = store_->add("ucx/closing", 1);
            while (arrived < size_ && !aborted_) {
                std::this_thread::sleep_for(std::chrono::milliseconds(2));
                arrived = store_parse_int("ucx/closing", store_->get("ucx/closing", 60));
            }
        } catch (const Error& e) {
            log::warn("comm", "rank {}: UCX shutdown barrier: {}", rank_, e.what());
        }
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            stopping_ = true;
        }
        state_cv_.notify_all();
        wake();
        progress_.join();
        std::lock_guard<std::mutex> lock(ucx_mutex_);
        if (aborted_) {
            // Operations still posted (with a lost peer): cancel them and let their callbacks run.
            std::vector<void*> handles;
            {
                std::lock_guard<std::mutex> slock(state_mutex_);
                for (auto& [p, r] : in_flight_)
                    if (r->handle) handles.push_back(r->handle);
            }
            for (void* h : handles) ucp_request_cancel(worker_, h);
            for (int i = 0; i < 100 && !in_flight_empty(); ++i) progress_locked();
        }
        for (ucp_ep_h ep : endpoints_) {
            ucp_request_param_t p{};
            p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = UCP_EP_CLOSE_FLAG_FORCE;
            void* req = ucp_ep_close_nbx(ep, &p);
            if (UCS_PTR_IS_PTR(req)) {
                while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker_);
                ucp_request_free(req);
            }
        }
        ucp_worker_destroy(worker_);
        ucp_cleanup(context_);
    }

    const char* name() const override { return "ucx"; }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    std::vector<std::string> hostnames() const override { return hostnames_; }
    std::string describe() const override {
        int host = 0, pairs = 0;
        for (int r = 0; r < size_; ++r)
            if (r != rank_ && hostnames_[r] == hostnames_[rank_]) {
                ++host;
                pairs += cma_peer_[r];
            }
        std::string copy = cma_min_ == 0 ? "single copy off"
                           : host == 0   ? "no other rank on this host"
                                         : fmt::format("single copy with {} of {} ranks of this host from {} bytes",
                                                       pairs, host, cma_min_);
        int mapped = 0;
        for (int r = 0; r < size_; ++r) mapped += map_to_[r];
        if (mapped > 0) copy += fmt::format(", shared arena mapped by {} of them", mapped);
        return fmt::format("ucx ({}; peer errors {})", copy, peer_errors_ ? "on" : "off");
    }

    std::map<std::string, uint64_t> counters() const override {
        return {{"single_copy_mapped", mapped_copies_.load()}, {"single_copy_read", remote_reads_.load()}};
    }

    HostBuffer allocate_host(size_t bytes) override {
        if (!arena_ || bytes == 0) return allocate_ordinary_host(bytes);
        void* p = arena_->allocate(bytes);
        if (!p) {
            if (!arena_full_logged_.exchange(true))
                log::info("comm", "rank {}: UCX shared arena full ({} in use of {}, {}): {} from ordinary memory, "
                          "copied with process_vm_readv", rank_, human_bytes(double(arena_->bytes_in_use())),
                          human_bytes(double(arena_->capacity())), kArena.name(), human_bytes(double(bytes)));
            return allocate_ordinary_host(bytes);
        }
        return HostBuffer(p, bytes, [arena = arena_](void* q) { arena->release(q); });
    }

    std::shared_ptr<Request> isend(int peer, uint64_t tag, const void* buf, size_t bytes) override {
        auto req = std::make_shared<UcxRequest>(peer, tag, bytes, true);
        if (failed(*req)) return req;  // at once, without waiting for a worker that may be stuck on a dead peer
        uint64_t wire = (uint64_t(rank_) << kSourceShift) | (tag & kWireMask);
        {
            std::lock_guard<std::mutex> lock(ucx_mutex_);
            if (failed(*req)) return req;  // again under the worker's lock: fail_all sees every post
            if (single_copy(peer, bytes)) {
                // Offer the buffer; the send completes when the receiver answers that it has read it.
                track(req);
                auto answer = make_part(req, Part::AnswerRecv, false);
                auto offer = make_part(req, Part::OfferSend, true);
                offer->offer.pid = static_cast<uint64_t>(getpid());
                offer->offer.address = reinterpret_cast<uint64_t>(buf);
                if (map_to_[peer] && arena_->contains(buf, bytes)) {
                    offer->offer.magic = kMappedMagic;
                    offer->offer.address = arena_->offset_of(buf);
                }
                offer->offer.bytes = bytes;
                post_locked(answer, [&](const ucp_request_param_t* p) {
                    return ucp_tag_recv_nbx(worker_, &answer->answer, sizeof(CmaAnswer),
                                            kAnswerBit | (uint64_t(peer) << kSourceShift) | (tag & kWireMask),
                                            ~uint64_t(0), p);
                });
                post_locked(offer, [&](const ucp_request_param_t* p) {
                    return ucp_tag_send_nbx(endpoints_.at(peer), &offer->offer, sizeof(CmaOffer), wire, p);
                });
            } else {
                post_locked(req, [&](const ucp_request_param_t* p) {
                    return ucp_tag_send_nbx(endpoints_.at(peer), buf, bytes, wire, p);
                });
            }
        }
        posted();
        return req;
    }

    std::shared_ptr<Request> irecv(int peer, uint64_t tag, void* buf, size_t bytes) override {
        auto req = std::make_shared<UcxRequest>(peer, tag, bytes, false);
        if (failed(*req)) return req;  // at once, without waiting for a worker that may be stuck on a dead peer
        uint64_t wire = (uint64_t(peer) << kSourceShift) | (tag & kWireMask);
        {
            std::lock_guard<std::mutex> lock(ucx_mutex_);
            if (failed(*req)) return req;  // again under the worker's lock: fail_all sees every post
            if (single_copy(peer, bytes)) {
                // Receive the sender's offer; its buffer is read after the progress call that delivers it.
                track(req);
                req->destination = buf;
                auto offer = make_part(req, Part::OfferRecv, false);
                post_locked(offer, [&](const ucp_request_param_t* p) {
                    return ucp_tag_recv_nbx(worker_, &offer->offer, sizeof(CmaOffer), wire, ~uint64_t(0), p);
                });
            } else {
                post_locked(req, [&](const ucp_request_param_t* p) {
                    return ucp_tag_recv_nbx(worker_, buf, bytes, wire, ~uint64_t(0), p);
                });
            }
        }
        posted();
        return req;
    }

    bool wait(Request& request, const Deadline& deadline) override {
        // Drive the worker from the waiting thread while messages keep arriving; when it goes quiet, sleep
        // on the request and leave progress to the progress thread.
        Stopwatch quiet;
        drivers_.fetch_add(1, std::memory_order_relaxed);
        struct Leave {
            std::atomic<int>& n;
            ~Leave() { n.fetch_sub(1, std::memory_order_relaxed); }
        } leave{drivers_};
        while (!request.done()) {
            if (deadline.expired()) return false;
            unsigned progressed = 0;
            if (ucx_mutex_.try_lock()) {
                progressed = progress_locked();
                ucx_mutex_.unlock();
            }
            if (progressed) {
                quiet.reset();
            } else if (quiet.seconds() > kSpinBeforeSleep_s) {
                // Quiet for a while: hand progress back to the progress thread and sleep on the request.
                drivers_.fetch_sub(1, std::memory_order_relaxed);
                state_cv_.notify_all();
                Deadline slice(1e-3);
                struct Rejoin {
                    std::atomic<int>& n;
                    ~Rejoin() { n.fetch_add(1, std::memory_order_relaxed); }
                } rejoin{drivers_};
                if (request.wait_until(deadline.infinite() || slice.at() < deadline.at() ? slice : deadline)) break;
            } else {
                std::this_thread::yield();
            }
        }
        return true;
    }

    void cancel(Request& request) override {
        if (request.done()) return;
        {
            std::lock_guard<std::mutex> lock(ucx_mutex_);
            auto& r = static_cast<UcxRequest&>(request);
            if (r.handle) ucp_request_cancel(worker_, r.handle);
            for (auto& weak : r.parts)
                if (auto part = weak.lock(); part && part->handle) ucp_request_cancel(worker_, part->handle);
            // NOTE: a single-copy receive is settled here, under the worker's lock, so no read lands in its buffer
            // after this returns; a receiver already reading a cancelled send's buffer may read what replaced it.
            if (!r.parts.empty())
                settle(r, fmt::format("rank {}: {} rank {} cancelled", rank_, r.is_send ? "send to" : "receive from", r.peer));
        }
        wake();
        request.wait_until(Deadline(0));
    }

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
        in_flight_[req.get()] = req;
    }

    // Posts one UCX operation for req (ucx_mutex_ held); call(params) makes the UCX call.
    template <typename Call>
    void post_locked(const std::shared_ptr<UcxRequest>& req, Call&& call) {
        track(req);
        ucp_request_param_t p{};
        p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        if (req->is_send)
            p.cb.send = &UcxTransport::on_send;
        else
            p.cb.recv = &UcxTransport::on_recv;
        p.user_data = req.get();
        // NOTE: UCX may run the completion callback inside this call, before it returns the handle.
        ucs_status_ptr_t h = call(&p);
        if (UCS_PTR_IS_ERR(h)) {
            settle(*req, fmt::format("rank {}: UCX {} rank {} failed: {}", rank_, req->is_send ? "send to" : "receive from",
                                     req->peer, ucs_status_string(UCS_PTR_STATUS(h))));
            return;
        }
        if (!req->done()) req->handle = h;
    }

    // After posting (ucx_mutex_ released): wake the progress thread.
    void posted() {
        state_cv_.notify_one();
        wake();
    }

    // Completes a request (ucx_mutex_ held) and carries the outcome of an internal part to its user request: an
    // error fails it; an answer completes a single-copy send; an offer is queued for reading.
    void settle(UcxRequest& r, std::string error) {
        std::shared_ptr<UcxRequest> keep;
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            auto it = in_flight_.find(&r);
            if (it != in_flight_.end()) {
                keep = std::move(it->second);
                in_flight_.erase(it);
            }
        }
        bool was_open = r.complete(error);
        if (r.part == Part::User) return;
        if (!was_open) {
            // Completed by fail_all, which completed its user request too: only forget that one.
            if (r.parent->done()) settle(*r.parent, {});
            return;
        }
        UcxRequest& user = *r.parent;
        if (!error.empty()) {
            // A lost answer only matters to the peer; every other part's failure is the user request's.
            if (r.part != Part::AnswerSend) settle(user, std::move(error));
            return;
        }
        switch (r.part) {
            case Part::OfferRecv: offers_.push_back(std::move(keep)); break;  // read after this progress call
            case Part::AnswerRecv:
                if (r.answer.status == 0)
                    settle(user, {});
                else if (r.answer.status == kAnswerMismatch)
                    settle(user, size_mismatch_error(rank_, fmt::format("{} bytes", user.bytes), user.peer, r.answer.posted));
                else
                    settle(user, fmt::format("rank {}: rank {} could not read this rank's buffer: {}", rank_, user.peer,
                                             std::strerror(static_cast<int>(r.answer.status))));
                break;
            default: break;  // the offer went out (wait for the answer); the answer went out
        }
    }

    // Progress, then the single-copy reads its offers asked for (ucx_mutex_ held).
    unsigned progress_locked() {
        unsigned n = ucp_worker_progress(worker_);
        std::vector<std::shared_ptr<UcxRequest>> ready;
        ready.swap(offers_);
        for (auto& offer : ready) read_offer(*offer);
        return n + unsigned(ready.size());
    }

    // Reads the bytes an offer points at into the user's buffer, then answers the sender.
    void read_offer(UcxRequest& offer) {
        UcxRequest& user = *offer.parent;
        const CmaOffer& o = offer.offer;
        CmaAnswer answer;
        answer.posted = user.bytes;
        std::string error;
        int err = 0;
        {
            // NOTE: fail_all may complete the request from another thread without the worker's lock; copy_mutex_
            // makes "not done yet, so fill its buffer" one step, so no byte lands after its waiter has moved on.
            std::lock_guard<std::mutex> copying(copy_mutex_);
            if (user.done()) return;  // cancelled or failed meanwhile: the buffer is no longer ours to fill
            const char* mapped = nullptr;
            if (o.magic == kMappedMagic && peer_arena_[user.peer])
                mapped = peer_arena_[user.peer]->at(o.address, o.bytes);
            if (o.magic != kOfferMagic && o.magic != kMappedMagic) {
                error = fmt::format("rank {}: rank {} sent a plain message where a single-copy offer was expected "
                                    "(sizes differ: this rank posted {} bytes)", rank_, user.peer, user.bytes);
                answer.status = kAnswerMismatch;
            } else if (o.bytes != user.bytes) {
                error = size_mismatch_error(user.peer, fmt::format("{} bytes", o.bytes), rank_, user.bytes);
                answer.status = kAnswerMismatch;
            } else if (o.magic == kMappedMagic && !mapped) {
                error = fmt::format("rank {}: rank {} offered bytes {}..{} of a shared arena this rank has not mapped "
                                    "(or beyond it)", rank_, user.peer, o.address, o.address + o.bytes);
                answer.status = EFAULT;
            } else if (mapped) {
                std::memcpy(user.destination, mapped, user.bytes);
                mapped_copies_.fetch_add(1, std::memory_order_relaxed);
            } else if ((err = read_remote(static_cast<pid_t>(o.pid), o.address, user.destination, user.bytes))) {
                error = fmt::format("rank {}: reading rank {}'s buffer failed: {}", rank_, user.peer, std::strerror(err));
                answer.status = err;
            } else {
                remote_reads_.fetch_add(1, std::memory_order_relaxed);
            }
        }
        if (err == ESRCH) {
            // The sender is gone: nobody to answer, and this rank's operations fail with it (as with UCX's peer
            // errors): one failed receive alone would let its caller unwind and free the buffers of the others
            // while their offers still arrive and are read.
            fail_all(fmt::format("rank {}: lost rank {} (its process is gone while reading its buffer)", rank_, user.peer),
                     /*worker_locked=*/true);
            return;
        }
        auto reply = make_part(offer.parent, Part::AnswerSend, true);
        reply->answer = answer;
        uint64_t tag = kAnswerBit | (uint64_t(rank_) << kSourceShift) | (user.tag & kWireMask);
        post_locked(reply, [&](const ucp_request_param_t* p) {
            return ucp_tag_send_nbx(endpoints_.at(user.peer), &reply->answer, sizeof(CmaAnswer), tag, p);
        });
        settle(user, std::move(error));
    }

    // process_vm_readv in pieces (one call moves at most about 2 GiB); 0 or the errno.
    static int read_remote(pid_t pid, uint64_t address, void* into, size_t bytes) {
        size_t done = 0;
        while (done < bytes) {
            size_t piece = std::min<size_t>(bytes - done, size_t(1) << 30);
            iovec local{static_cast<char*>(into) + done, piece};
            iovec remote{reinterpret_cast<void*>(address + done), piece};
            ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno;
            }
            if (n == 0) return EFAULT;
            done += static_cast<size_t>(n);
        }
        return 0;
    }

    bool single_copy(int peer, size_t bytes) const {
        return cma_min_ > 0 && bytes >= static_cast<size_t>(cma_min_) && peer != rank_ && cma_peer_[peer];
    }

    // Every rank reads a word from each rank of its host (process_vm_readv) and says whether it could; a pair uses
    // single copy only when both could, so both sides of a message agree on its protocol.
    void agree_on_single_copy() {
        cma_peer_.assign(size_, false);
        // Yama's ptrace_scope 1 lets only descendants read a process: allow the other ranks.
        prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
        cma_probe_ = kOfferMagic ^ static_cast<uint64_t>(rank_);
        store_->set(fmt::format("ucx/cma/{}", rank_),
                    fmt::format("{} {} {} {}", getpid(), reinterpret_cast<uint64_t>(&cma_probe_), arena_ ? arena_->fd() : -1,
                                arena_ ? arena_->capacity() : 0));
        std::vector<int> host;
        for (int r = 0; r < size_; ++r)
            if (r != rank_ && hostnames_[r] == hostnames_[rank_]) host.push_back(r);
        bool readable = true;
        std::string why;
        peer_arena_.resize(size_);
        std::string mapped(size_, '0');  // which ranks' arenas this rank maps
        for (int r : host) {
            unsigned long long pid = 0, address = 0, capacity = 0;
            int fd = -1;
            std::string where = store_->get(fmt::format("ucx/cma/{}", r), 120.0);
            uint64_t word = 0;
            int err = sscanf(where.c_str(), "%llu %llu %d %llu", &pid, &address, &fd, &capacity) == 4
                          ? read_remote(static_cast<pid_t>(pid), address, &word, sizeof(word))
                          : EINVAL;
            if (!err && fd >= 0 && arena_) {
                try {
                    auto arena = std::make_unique<MappedArena>(static_cast<pid_t>(pid), fd, capacity);
                    const char* probe = arena->at(0, sizeof(uint64_t));
                    if (probe && std::memcmp(probe, &word, sizeof(word)) == 0) {
                        peer_arena_[r] = std::move(arena);
                        mapped[r] = '1';
                    }
                } catch (const Error& e) {
                    log::debug("comm", "rank {}: rank {}'s shared arena: {}", rank_, r, e.what());
                }
            }
            if (err || word != (kOfferMagic ^ static_cast<uint64_t>(r))) {
                readable = false;
                why = fmt::format("reading rank {}'s memory: {}", r, err ? std::strerror(err) : "another process (pid namespace?)");
                break;
            }
        }
        store_->set(fmt::format("ucx/cma_ok/{}", rank_), readable ? "1" : "0");
        store_->set(fmt::format("ucx/mapped/{}", rank_), mapped);
        map_to_.assign(size_, false);
        int pairs = 0;
        for (int r : host) {
            bool theirs = store_->get(fmt::format("ucx/cma_ok/{}", r), 120.0) == "1";
            cma_peer_[r] = readable && theirs;
            pairs += cma_peer_[r];
            map_to_[r] = cma_peer_[r] && arena_ && store_->get(fmt::format("ucx/mapped/{}", r), 120.0)[rank_] == '1';
        }
        if (!readable)
            log::info("comm", "rank {}: UCX single copy off ({}); same-host messages go through UCX", rank_, why);
        else
            log::debug("comm", "rank {}: UCX single copy with {} of {} ranks of this host (messages >= {} bytes)", rank_,
                       pairs, host.size(), cma_min_);
    }

    // The arena allocate_host hands out; its header page holds the probe word, so the ranks that map it check that they
    // see this process's pages. Without it (off, or the system refuses) buffers are ordinary memory.
    void open_arena() {
        size_t capacity = parse_size(kArena.get(), kArena.name());
        if (capacity == 0) return;
        try {
            arena_ = std::make_shared<SharedArena>(capacity);
        } catch (const Error& e) {
            log::info("comm", "rank {}: no UCX shared arena ({}); allocate_host gives ordinary memory", rank_, e.what());
            return;
        }
        cma_probe_ = kOfferMagic ^ static_cast<uint64_t>(rank_);
        std::memcpy(arena_->header(), &cma_probe_, sizeof(cma_probe_));
    }

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
    void finish(UcxRequest* r, void* ucx_request, ucs_status_t status, size_t received) {
        ucp_request_free(ucx_request);
        r->handle = nullptr;
        std::string error;
        if (status == UCS_ERR_CANCELED && aborted_) {
            error = abort_reason_;
        } else if (status == UCS_ERR_CANCELED) {
            error = fmt::format("rank {}: {} rank {} cancelled", rank_, r->is_send ? "send to" : "receive from", r->peer);
        } else if (r->part == Part::OfferRecv && (status == UCS_ERR_MESSAGE_TRUNCATED || (status == UCS_OK && received != sizeof(CmaOffer)))) {
            error = size_mismatch_error(r->peer, "a plain message", rank_, r->parent->bytes) + " (a single-copy size)";
        } else if (status == UCS_ERR_MESSAGE_TRUNCATED || (status == UCS_OK && !r->is_send && received != r->bytes)) {
            error = size_mismatch_error(r->peer, status == UCS_OK ? fmt::format("{} bytes", received) : "more bytes", rank_,
                                        r->bytes);
        } else if (status != UCS_OK) {
            error = fmt::format("rank {}: UCX {} rank {} failed: {}", rank_, r->is_send ? "send to" : "receive from",
                                r->peer, ucs_status_string(status));
        }
        settle(*r, std::move(error));
    }

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
    void fail_all(const std::string& why, bool worker_locked = false) {
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            if (!aborted_) abort_reason_ = why;  // the first reason names the culprit
            aborted_ = true;
        }
        std::unique_lock<std::mutex> worker(ucx_mutex_, std::defer_lock);
        // NOTE: never block on the worker here: a caller may be stuck inside UCX on the dead peer.
        for (int i = 0; !worker_locked && i < 100 && !worker.try_lock(); ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        // What is in flight once the worker is ours: isend/irecv check aborted_ again under the worker's lock, so
        // nothing is posted after this that escapes it.
        std::unordered_map<UcxRequest*, std::shared_ptr<UcxRequest>> pending;
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            pending = in_flight_;
        }
        if (worker_locked || worker.owns_lock()) {
            for (auto& [p, r] : pending)
                if (r->handle) ucp_request_cancel(worker_, r->handle);
            if (!worker_locked)
                for (int i = 0; i < 8; ++i) progress_locked();  // deliver the cancellations
        }
        std::lock_guard<std::mutex> copying(copy_mutex_);  // a read under way finishes first (read_offer)
        for (auto& [p, r] : pending) r->complete(abort_reason_);
    }

    // Drives the worker while anything is in flight; sleeps on the condition variable otherwise, and on the
    // worker's event descriptor when a progress round found nothing to do.
    void progress_loop() {
        Stopwatch since_abort_check, idle;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(state_mutex_);
                state_cv_.wait(lock, [&] { return stopping_ || !in_flight_.empty(); });
                // After an abort, operations with a lost peer never finish: stop anyway (the destructor cancels them).
                if (stopping_ && (in_flight_.empty() || aborted_)) return;
            }
            if (drivers_.load(std::memory_order_relaxed) > 0) {
                // A waiting caller drives the worker itself; competing for it would only cost a core.
                std::unique_lock<std::mutex> lock(state_mutex_);
                state_cv_.wait_for(lock, std::chrono::milliseconds(1));
                continue;
            }
            unsigned progressed = 0;
            ucs_status_t armed = UCS_ERR_BUSY;
            {
                std::lock_guard<std::mutex> lock(ucx_mutex_);
                while (unsigned n = progress_locked()) progressed += n;
                if (progressed) {
                    idle.reset();
                } else if (idle.seconds() > kSpinBeforeSleep_s) {
                    polling_.store(true);
                    armed = ucp_worker_arm(worker_);
                }
            }
            if (armed == UCS_OK) {
                // NOTE: shared-memory transports may not signal the event descriptor, hence the short timeout.
                pollfd pfd{efd_, POLLIN, 0};
                poll(&pfd, 1, 1);
            }
            polling_.store(false);
            if (armed != UCS_OK && !progressed) {
                std::this_thread::yield();
            }
            if (since_abort_check.seconds() > 0.5 && !aborted_) {
                since_abort_check.reset();
                try {
                    if (auto why = store_->try_get("ucx/abort")) fail_all(*why);
                } catch (const Error&) {
                }
            }
        }
    }

    std::shared_ptr<Store> store_;
    int rank_, size_;
    ucp_context_h context_ = nullptr;
    ucp_worker_h worker_ = nullptr;
    int efd_ = -1;
    std::vector<ucp_ep_h> endpoints_;
    std::vector<PeerRef> peers_;  // error-handler arguments, one per endpoint
    bool peer_errors_ = false;    // UCX's peer failure mode (TCP on one host)
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
    std::condition_variable state_cv_;
    std::unordered_map<UcxRequest*, std::shared_ptr<UcxRequest>> in_flight_;
    bool stopping_ = false;
    std::atomic<bool> aborted_{false};
    std::mutex copy_mutex_;  // held while a single-copy receive fills its buffer, and while fail_all completes requests
    std::atomic<int> drivers_{0};  // callers inside wait() driving the worker
    std::atomic<bool> polling_{false};  // the progress thread may be asleep in poll()
    std::string abort_reason_;
    std::thread progress_;
};

}  // namespace

std::shared_ptr<Transport> make_ucx_transport(std::shared_ptr<Store> store, int rank, int world_size) {
    return std::make_shared<UcxTransport>(std::move(store), rank, world_size);
}

}  // namespace duplex
