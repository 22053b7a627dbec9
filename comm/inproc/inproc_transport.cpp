#include "comm/inproc/inproc_transport.hpp"

#include <atomic>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

namespace {

struct InprocRequest : Request {
    InprocRequest(int owner, int peer, uint64_t tag, size_t bytes, bool is_send, const void* sbuf, void* rbuf)
        : Request(peer, tag, bytes, is_send), owner(owner), send_buf(sbuf), recv_buf(rbuf) {}
    int owner;
    const void* send_buf;
    void* recv_buf;
};
using Req = std::shared_ptr<InprocRequest>;
using Key = std::pair<int, uint64_t>;  // (source rank, tag)

struct Mailbox {
    std::mutex mutex;
    std::map<Key, std::deque<Req>> sends;  // arrived before their receive
    std::map<Key, std::deque<Req>> recvs;  // posted before their send
};

std::string describe_tag(uint64_t tag) {
    return fmt::format("group {} {} tag {}", tag >> 33, (tag >> 32) & 1 ? "collective" : "p2p", tag & 0xFFFFFFFFu);
}

// Copies a matched pair and completes both sides.
void transfer(const Req& send, const Req& recv) {
    if (send->bytes != recv->bytes) {
        std::string why = fmt::format("message size mismatch: rank {} sent {} bytes to rank {} ({}) which posted {} bytes",
                                      send->owner, send->bytes, recv->owner, describe_tag(send->tag), recv->bytes);
        recv->complete(why);
        send->complete(why);
        return;
    }
    if (send->bytes > 0) std::memcpy(recv->recv_buf, send->send_buf, send->bytes);
    recv->complete();
    send->complete();
}

Req pop_front(std::map<Key, std::deque<Req>>& queues, const Key& key) {
    auto it = queues.find(key);
    if (it == queues.end()) return nullptr;
    Req r = std::move(it->second.front());
    it->second.pop_front();
    if (it->second.empty()) queues.erase(it);
    return r;
}

bool remove(std::map<Key, std::deque<Req>>& queues, const Request* target) {
    auto it = queues.find({target->is_send ? static_cast<const InprocRequest*>(target)->owner : target->peer, target->tag});
    if (it == queues.end()) return false;
    auto& q = it->second;
    for (auto qi = q.begin(); qi != q.end(); ++qi) {
        if (qi->get() == target) {
            q.erase(qi);
            if (q.empty()) queues.erase(it);
            return true;
        }
    }
    return false;
}

}  // namespace

struct InprocFabric::Impl {
    explicit Impl(int n) : mailboxes(n) {}
    std::vector<Mailbox> mailboxes;
    std::atomic<bool> aborted{false};
    std::mutex abort_mutex;
    std::string abort_reason;

    std::string reason() {
        std::lock_guard<std::mutex> lock(abort_mutex);
        return abort_reason;
    }
};

namespace {

// How long a waiting rank polls its request before sleeping on it.
constexpr double kSpin_s = 50e-6;

class InprocTransport : public Transport {
public:
    InprocTransport(std::shared_ptr<InprocFabric> fabric, InprocFabric::Impl& impl, int rank)
        : fabric_(std::move(fabric)), impl_(impl), rank_(rank) {}

    const char* name() const override { return "inproc"; }
    int rank() const override { return rank_; }
    int size() const override { return static_cast<int>(impl_.mailboxes.size()); }
    std::vector<std::string> hostnames() const override { return std::vector<std::string>(size(), "inproc"); }

    std::shared_ptr<Request> isend(int peer, uint64_t tag, const void* buf, size_t bytes) override {
        check_peer(peer, "isend");
        auto req = std::make_shared<InprocRequest>(rank_, peer, tag, bytes, true, buf, nullptr);
        Mailbox& mb = impl_.mailboxes[peer];
        Req recv;
        {
            std::lock_guard<std::mutex> lock(mb.mutex);
            if (impl_.aborted.load()) {
                req->complete(impl_.reason());
                return req;
            }
            recv = pop_front(mb.recvs, {rank_, tag});
            if (!recv) mb.sends[{rank_, tag}].push_back(req);
        }
        if (recv) transfer(req, recv);
        return req;
    }

    std::shared_ptr<Request> irecv(int peer, uint64_t tag, void* buf, size_t bytes) override {
        check_peer(peer, "irecv");
        auto req = std::make_shared<InprocRequest>(rank_, peer, tag, bytes, false, nullptr, buf);
        Mailbox& mb = impl_.mailboxes[rank_];
        Req send;
        {
            std::lock_guard<std::mutex> lock(mb.mutex);
            if (impl_.aborted.load()) {
                req->complete(impl_.reason());
                return req;
            }
            send = pop_front(mb.sends, {peer, tag});
            if (!send) mb.recvs[{peer, tag}].push_back(req);
        }
        if (send) transfer(send, req);
        return req;
    }

    // The peer's thread completes the request. Polling it (yielding the core) for up to kSpin before sleeping on it
    // makes a small message's round trip microseconds instead of two thread wake-ups (37 us per 8-byte exchange on 2
    // ranks here before, BENCHMARKS.md); a longer wait sleeps as before.
    bool wait(Request& request, const Deadline& deadline) override {
        Stopwatch spun;
        for (unsigned polls = 1; !request.done(); ++polls) {
            if (polls % 16 == 0 && spun.seconds() > kSpin_s) return request.wait_until(deadline);
            std::this_thread::yield();
        }
        return true;
    }

    void cancel(Request& request) override {
        if (request.done()) return;
        // A send waits in the destination's mailbox, a receive in our own.
        Mailbox& mb = impl_.mailboxes[request.is_send ? request.peer : rank_];
        bool removed;
        {
            std::lock_guard<std::mutex> lock(mb.mutex);
            removed = remove(request.is_send ? mb.sends : mb.recvs, &request);
        }
        if (removed) {
            request.complete(fmt::format("rank {}: {} cancelled", rank_, request.is_send ? "send" : "receive"));
        } else {
            // NOTE: matched already: the copy is under way on the peer's thread and ends shortly.
            request.wait_until(Deadline(0));
        }
    }

    void abort(const std::string& reason) override {
        {
            std::lock_guard<std::mutex> lock(impl_.abort_mutex);
            if (impl_.aborted.load()) return;
            impl_.abort_reason = fmt::format("rank {} failed: {}", rank_, reason);
            impl_.aborted.store(true);
        }
        std::string why = impl_.reason();
        for (Mailbox& mb : impl_.mailboxes) {
            std::map<Key, std::deque<Req>> sends, recvs;
            {
                std::lock_guard<std::mutex> lock(mb.mutex);
                sends.swap(mb.sends);
                recvs.swap(mb.recvs);
            }
            for (auto& [k, q] : sends)
                for (auto& r : q) r->complete(why);
            for (auto& [k, q] : recvs)
                for (auto& r : q) r->complete(why);
        }
    }

private:
    void check_peer(int peer, const char* op) const {
        if (peer < 0 || peer >= size())
            throw CommError(fmt::format("{}: peer {} outside 0..{}", comm_context(rank_, op), peer, size() - 1));
    }

    std::shared_ptr<InprocFabric> fabric_;
    InprocFabric::Impl& impl_;
    int rank_;
};

}  // namespace

void check_inproc_ranks(int world_size) {
    if (world_size < 1) throw ConfigError("--ranks", fmt::format("world size must be at least 1, got {}", world_size));
    // In-process ranks are threads of one process, each with per-peer state: past a few thousand the process
    // runs out of threads or memory long before any work is done (emulate mode is meant for 16-256 ranks).
    if (world_size > kMaxInprocRanks)
        throw ConfigError("--ranks", fmt::format("{} in-process ranks: at most {} (they are threads of this process); "
                                                 "run more as processes (mpirun / torchrun, backend ucx or mpi)",
                                                 world_size, kMaxInprocRanks));
}

std::shared_ptr<InprocFabric> InprocFabric::create(int world_size) {
    check_inproc_ranks(world_size);
    auto f = std::shared_ptr<InprocFabric>(new InprocFabric());
    f->impl_ = std::make_unique<Impl>(world_size);
    return f;
}

InprocFabric::~InprocFabric() = default;

int InprocFabric::size() const { return static_cast<int>(impl_->mailboxes.size()); }

std::shared_ptr<Transport> InprocFabric::transport(int rank) {
    if (rank < 0 || rank >= size()) throw ConfigError("rank", fmt::format("{} outside 0..{}", rank, size() - 1));
    return std::make_shared<InprocTransport>(shared_from_this(), *impl_, rank);
}

}  // namespace duplex
