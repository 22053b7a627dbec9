// The UCX transport's single copy between ranks of one host: a large message's receiver copies it once, out of
// its mapping of the sender's shared arena (buffers from allocate_host) or with process_vm_readv, after a 32-byte
// offer; the ranks of a host first agree on which pairs can read each other.
#include "comm/ucx/ucx_impl.hpp"

namespace duplex::ucx_detail {

std::string UcxTransport::describe() const {
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
    return fmt::format("ucx ({}; peer errors {}{})", copy, peer_errors_ ? "on" : "off",
                       shared_memory_only_ ? "; one host: shared memory only" : "");
}

HostBuffer UcxTransport::allocate_host(size_t bytes) {
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

void UcxTransport::read_offer(UcxRequest& offer) {
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

int UcxTransport::read_remote(pid_t pid, uint64_t address, void* into, size_t bytes) {
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

void UcxTransport::agree_on_single_copy() {
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

void UcxTransport::open_arena() {
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

}  // namespace duplex::ucx_detail
