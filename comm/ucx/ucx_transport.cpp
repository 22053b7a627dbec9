#include "comm/ucx/ucx_transport.hpp"

#include <poll.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"
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

// NOTE: UCX's peer error handling keeps it to transports that can report a dead peer: on one node TCP instead of
// shared memory with CMA single-copy, 2-4x slower all-to-all (BENCHMARKS.md, scripts/bench-ucx-default). Without
// it a lost rank is usually named by the store's watchdog, but a CMA copy from a process that just died is fatal
// inside UCX: the survivor aborts with UCX's backtrace instead of an error naming the rank (half the runs that
// killed rank 0, the store's host; 1 in 7 that killed rank 2). Safety is the default; bandwidth-bound runs opt out.
const Knob<bool> kUcxPeerErrors("DUPLEX_UCX_PEER_ERRORS", true,
                                "1 (default): a dead peer fails the survivors' operations with an error naming it "
                                "(UCX keeps to TCP on one node: 2-4x slower all-to-all); 0: UCX's shared-memory "
                                "transports (about Open MPI's bandwidth), a lost rank named by the store's watchdog "
                                "but sometimes only by UCX aborting the survivor");

constexpr int kSourceShift = 49;  // bits 49..63 carry the sender's rank; below them the wire tag
constexpr uint64_t kWireMask = (uint64_t(1) << kSourceShift) - 1;

struct UcxRequest : Request {
    using Request::Request;
    void* handle = nullptr;  // UCX's request while in flight
    class UcxTransport* owner = nullptr;
};

class UcxTransport : public Transport {
public:
    UcxTransport(std::shared_ptr<Store> store, int rank, int size) : store_(std::move(store)), rank_(rank), size_(size) {
        if (size > (1 << (64 - kSourceShift)))
            throw ConfigError("world size", fmt::format("UCX backend supports up to {} ranks, got {}",
                                                        1 << (64 - kSourceShift), size));
        ucp_config_t* config = nullptr;
        DUPLEX_UCX_CHECK(ucp_config_read(nullptr, nullptr, &config));
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
            if (kUcxPeerErrors.get()) {
                // A peer that dies fails this rank's operations naming it, instead of UCX aborting the process.
                ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
                ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
                peers_[r] = {this, r};
                ep.err_handler.cb = on_peer_error;
                ep.err_handler.arg = &peers_[r];
            }
            DUPLEX_UCX_CHECK(ucp_ep_create(worker_, &ep, &endpoints_[r]));
        }
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
            for (int i = 0; i < 100 && !in_flight_empty(); ++i) ucp_worker_progress(worker_);
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

    std::shared_ptr<Request> isend(int peer, uint64_t tag, const void* buf, size_t bytes) override {
        auto req = std::make_shared<UcxRequest>(peer, tag, bytes, true);
        if (failed(*req)) return req;
        ucp_request_param_t p{};
        p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        p.cb.send = &UcxTransport::on_send;
        p.user_data = req.get();
        post(req, [&] {
            return ucp_tag_send_nbx(endpoints_.at(peer), buf, bytes, (uint64_t(rank_) << kSourceShift) | (tag & kWireMask), &p);
        });
        return req;
    }

    std::shared_ptr<Request> irecv(int peer, uint64_t tag, void* buf, size_t bytes) override {
        auto req = std::make_shared<UcxRequest>(peer, tag, bytes, false);
        if (failed(*req)) return req;
        ucp_request_param_t p{};
        p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        p.cb.recv = &UcxTransport::on_recv;
        p.user_data = req.get();
        post(req, [&] {
            return ucp_tag_recv_nbx(worker_, buf, bytes, (uint64_t(peer) << kSourceShift) | (tag & kWireMask),
                                    ~uint64_t(0), &p);
        });
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
                progressed = ucp_worker_progress(worker_);
                ucx_mutex_.unlock();
            }
            if (progressed) {
                quiet.reset();
            } else if (quiet.seconds() > 200e-6) {
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
    template <typename Post>
    void post(const std::shared_ptr<UcxRequest>& req, Post&& call) {
        req->owner = this;
        {
            std::lock_guard<std::mutex> lock(ucx_mutex_);
            {
                std::lock_guard<std::mutex> slock(state_mutex_);
                in_flight_[req.get()] = req;
            }
            // NOTE: UCX may run the completion callback inside this call, before it returns the handle.
            ucs_status_ptr_t h = call();
            if (UCS_PTR_IS_ERR(h)) {
                {
                    std::lock_guard<std::mutex> slock(state_mutex_);
                    in_flight_.erase(req.get());
                }
                req->complete(fmt::format("rank {}: UCX {} rank {} failed: {}", rank_, req->is_send ? "send to" : "receive from",
                                          req->peer, ucs_status_string(UCS_PTR_STATUS(h))));
                return;
            }
            if (!req->done()) req->handle = h;
        }
        state_cv_.notify_one();
        wake();
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
        std::shared_ptr<UcxRequest> keep;
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            auto it = in_flight_.find(r);
            if (it != in_flight_.end()) {
                keep = std::move(it->second);
                in_flight_.erase(it);
            }
        }
        ucp_request_free(ucx_request);
        r->handle = nullptr;
        if (status == UCS_ERR_CANCELED && aborted_) {
            r->complete(abort_reason_);
        } else if (status == UCS_ERR_CANCELED) {
            r->complete(fmt::format("rank {}: {} rank {} cancelled", rank_, r->is_send ? "send to" : "receive from", r->peer));
        } else if (status == UCS_ERR_MESSAGE_TRUNCATED || (status == UCS_OK && !r->is_send && received != r->bytes)) {
            r->complete(fmt::format("message size mismatch: rank {} sent {} bytes to rank {} which posted {} bytes", r->peer,
                                    status == UCS_OK ? std::to_string(received) : std::string("more"), rank_, r->bytes));
        } else if (status != UCS_OK) {
            r->complete(fmt::format("rank {}: UCX {} rank {} failed: {}", rank_, r->is_send ? "send to" : "receive from",
                                    r->peer, ucs_status_string(status)));
        } else {
            r->complete();
        }
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
        std::unordered_map<UcxRequest*, std::shared_ptr<UcxRequest>> pending;
        {
            std::lock_guard<std::mutex> lock(state_mutex_);
            if (!aborted_) abort_reason_ = why;  // the first reason names the culprit
            aborted_ = true;
            pending = in_flight_;
        }
        std::unique_lock<std::mutex> worker(ucx_mutex_, std::defer_lock);
        // NOTE: never block on the worker here: a caller may be stuck inside UCX on the dead peer.
        for (int i = 0; !worker_locked && i < 100 && !worker.try_lock(); ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        if (worker_locked || worker.owns_lock()) {
            for (auto& [p, r] : pending)
                if (r->handle) ucp_request_cancel(worker_, r->handle);
            if (!worker_locked)
                for (int i = 0; i < 8; ++i) ucp_worker_progress(worker_);  // deliver the cancellations
        }
        for (auto& [p, r] : pending) r->complete(abort_reason_);
    }

    // Drives the worker while anything is in flight; sleeps on the condition variable otherwise, and on the
    // worker's event descriptor when a progress round found nothing to do.
    void progress_loop() {
        // Yield-spin this long after the last progress before sleeping: oversubscribed ranks get the core back
        // and a message that arrives soon is still seen within microseconds.
        constexpr double kSpinBeforeSleep_s = 200e-6;
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
                while (unsigned n = ucp_worker_progress(worker_)) progressed += n;
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
    std::vector<std::string> hostnames_;
    std::mutex ucx_mutex_;    // serializes every UCX call
    std::mutex state_mutex_;  // guards in_flight_, stopping_, abort state
    std::condition_variable state_cv_;
    std::unordered_map<UcxRequest*, std::shared_ptr<UcxRequest>> in_flight_;
    bool stopping_ = false;
    std::atomic<bool> aborted_{false};
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
