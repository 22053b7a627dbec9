#include "comm/ucx/ucx_transport.hpp"

#include "comm/ucx/ucx_impl.hpp"

namespace duplex {
namespace ucx_detail {

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

UcxTransport::UcxTransport(std::shared_ptr<Store> store, int rank, int size) : store_(std::move(store)), rank_(rank), size_(size) {
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
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    store_->set(fmt::format("ucx/host/{}", rank_), host);
    for (int r = 0; r < size_; ++r) hostnames_.push_back(store_->get(fmt::format("ucx/host/{}", r), 120.0));
    bool one_host = std::all_of(hostnames_.begin(), hostnames_.end(), [&](const std::string& h) { return h == host; });
    oversubscribed_ = ranks_outnumber_cores(hostnames_, host);
    if (!peer_errors_ && !std::getenv("UCX_TLS")) {
        // UCX's own CMA copy aborts the process when the peer just died; Duplex's single copy takes those
        // messages instead and fails with an error naming the rank. On one host shared memory reaches every rank, and
        // a TCP interface would only cost each progress call an epoll_wait (a system call per poll of a waiting
        // caller: 2-3x the latency of a small message).
        shared_memory_only_ = one_host;
        const char* tls = cma_min_ > 0 ? (one_host ? "^tcp,cma" : "^cma") : (one_host ? "^tcp" : nullptr);
        if (tls) DUPLEX_UCX_CHECK(ucp_config_modify(config, "TLS", tls));
        // Without CMA, UCX's rendezvous on one host is a chain of bounce-buffer fragments (4x the time of an
        // eager send at 32 KiB here): below the single-copy size, eager it is (on every link: UCX 1.13 has one
        // threshold for all).
        if (cma_min_ > 0 && !std::getenv("UCX_RNDV_THRESH"))
            DUPLEX_UCX_CHECK(ucp_config_modify(config, "RNDV_THRESH", std::to_string(cma_min_).c_str()));
    }
    // Shared memory's FIFO elements are 128 bytes by default, so a message above ~100 bytes (an all-to-all's 128-byte
    // blocks, a count exchange of 16 ranks) went through a separate bounce buffer instead of inline in the element
    // (the 8-rank all-to-all at 128 bytes per peer took 1.5-1.8x Open MPI's time, 1.3-1.5x since, BENCHMARKS.md):
    // 1 KiB elements keep messages up to ~1000 bytes inline, for 64 KiB of FIFO per process.
    if (!std::getenv("UCX_MM_FIFO_ELEM_SIZE") && !std::getenv("UCX_POSIX_FIFO_ELEM_SIZE") &&
        !std::getenv("UCX_SYSV_FIFO_ELEM_SIZE"))
        DUPLEX_UCX_CHECK(ucp_config_modify(config, "MM_FIFO_ELEM_SIZE", "1024"));
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
    store_->set(fmt::format("ucx/addr/{}", rank_), std::string(reinterpret_cast<char*>(address), address_len));
    ucp_worker_release_address(worker_, address);

    endpoints_.resize(size_, nullptr);
    peers_.resize(size_);
    for (int r = 0; r < size_; ++r) {
        std::string a = store_->get(fmt::format("ucx/addr/{}", r), 120.0);
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

void UcxTransport::close() {
    if (closed_) return;
    closed_ = true;
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
    fail_all(fmt::format("rank {}: the launch that made this communicator has ended", rank_));
}

UcxTransport::~UcxTransport() {
    close();
    {
        std::lock_guard<std::mutex> lock(state_mutex_);
        stopping_ = true;
    }
    gate_.wake_all();
    wake();
    progress_.join();
    std::lock_guard<std::mutex> lock(ucx_mutex_);
    if (aborted_) {
        // Operations still posted (with a lost peer): cancel them and let their callbacks run.
        std::vector<void*> handles;
        {
            std::lock_guard<std::mutex> slock(state_mutex_);
            for (auto& r : in_flight_.list())
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

std::shared_ptr<Request> UcxTransport::isend(int peer, uint64_t tag, const void* buf, size_t bytes) {
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
    posted(*req);
    return req;
}

std::shared_ptr<Request> UcxTransport::irecv(int peer, uint64_t tag, void* buf, size_t bytes) {
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
    posted(*req);
    return req;
}

bool UcxTransport::wait(Request& request, const Deadline& deadline) {
    // Drive the worker from the waiting thread: yield-spinning while messages keep arriving, then polling with
    // sleeps that grow to kMaxPollSleep_s. (Handing progress to the progress thread instead cost up to a
    // millisecond per message: its event wait misses shared-memory arrivals until its poll times out.) The clock is
    // read every kPollsPerClock polls only: a small message takes about as long as a few readings.
    if (request.done()) return true;
    ProgressGate::Driving driving(gate_);
    double nap_s = kMinPollSleep_s;
    unsigned empty_polls = 0;
    Clock::time_point quiet_since{};
    for (unsigned polls = 1; !request.done(); ++polls) {
        if (polls % kPollsPerClock == 0 && deadline.expired()) return false;
        unsigned progressed = 0;
        if (ucx_mutex_.try_lock()) {
            progressed = progress_locked();
            ucx_mutex_.unlock();
        }
        if (progressed) {
            empty_polls = 0;
            nap_s = kMinPollSleep_s;
            continue;
        }
        if (++empty_polls % kPollsPerClock == 0) {
            Clock::time_point now = Clock::now();
            if (empty_polls == kPollsPerClock) {
                quiet_since = now;
            } else if (now - quiet_since > std::chrono::duration<double>(kSpinBeforeSleep_s)) {
                std::this_thread::sleep_for(std::chrono::duration<double>(nap_s));
                nap_s = std::min(2 * nap_s, kMaxPollSleep_s);
                continue;
            }
        }
        if (empty_polls < kSpinPolls && !oversubscribed_) continue;
        std::this_thread::yield();
    }
    return true;
}

void UcxTransport::cancel(Request& request) {
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

void UcxTransport::settle(UcxRequest& r, std::string error) {
    std::shared_ptr<UcxRequest> keep;
    {
        std::lock_guard<std::mutex> lock(state_mutex_);
        keep = in_flight_.remove(r);
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

std::string UcxTransport::completion_error(const UcxRequest& r, ucs_status_t status, size_t received) const {
    if (status == UCS_ERR_CANCELED && aborted_) return abort_reason_;
    if (status == UCS_ERR_CANCELED)
        return fmt::format("rank {}: {} rank {} cancelled", rank_, r.is_send ? "send to" : "receive from", r.peer);
    if (r.part == Part::OfferRecv && (status == UCS_ERR_MESSAGE_TRUNCATED || (status == UCS_OK && received != sizeof(CmaOffer))))
        return size_mismatch_error(r.peer, "a plain message", rank_, r.parent->bytes) + " (a single-copy size)";
    if (status == UCS_ERR_MESSAGE_TRUNCATED || (status == UCS_OK && !r.is_send && received != r.bytes))
        return size_mismatch_error(r.peer, status == UCS_OK ? fmt::format("{} bytes", received) : "more bytes", rank_,
                                   r.bytes);
    if (status != UCS_OK)
        return fmt::format("rank {}: UCX {} rank {} failed: {}", rank_, r.is_send ? "send to" : "receive from", r.peer,
                           ucs_status_string(status));
    return {};
}

void UcxTransport::finish(UcxRequest* r, void* ucx_request, ucs_status_t status, size_t received) {
    ucp_request_free(ucx_request);
    r->handle = nullptr;
    settle(*r, completion_error(*r, status, received));
}

void UcxTransport::fail_all(const std::string& why, bool worker_locked) {
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
    std::vector<std::shared_ptr<UcxRequest>> pending;
    {
        std::lock_guard<std::mutex> lock(state_mutex_);
        pending = in_flight_.list();
    }
    if (worker_locked || worker.owns_lock()) {
        for (auto& r : pending)
            if (r->handle) ucp_request_cancel(worker_, r->handle);
        if (!worker_locked)
            for (int i = 0; i < 8; ++i) progress_locked();  // deliver the cancellations
    }
    std::lock_guard<std::mutex> copying(copy_mutex_);  // a read under way finishes first (read_offer)
    for (auto& r : pending) r->complete(abort_reason_);
}

void UcxTransport::progress_loop() {
    Stopwatch since_abort_check, idle;
    for (;;) {
        {
            std::unique_lock<std::mutex> lock(state_mutex_);
            bool work = gate_.wait_for_work(lock, [&] { return stopping_ || !in_flight_.empty(); });
            // After an abort, operations with a lost peer never finish: stop anyway (the destructor cancels them).
            if (stopping_ && (in_flight_.empty() || aborted_)) return;
            if (!work) continue;
            if (gate_.driven()) {
                // A waiting caller drives the worker itself; competing for it would only cost a core.
                gate_.nap(lock);
                continue;
            }
        }
        unsigned progressed = 0;
        ucs_status_t armed = UCS_ERR_BUSY;
        {
            std::lock_guard<std::mutex> lock(ucx_mutex_);
            while (unsigned n = progress_locked()) progressed += n;
            if (progressed) {
                idle.reset();
                gate_.worked();
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

}  // namespace ucx_detail

std::shared_ptr<Transport> make_ucx_transport(std::shared_ptr<Store> store, int rank, int world_size) {
    return std::make_shared<ucx_detail::UcxTransport>(std::move(store), rank, world_size);
}

}  // namespace duplex
