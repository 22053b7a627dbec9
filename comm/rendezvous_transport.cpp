#include "comm/rendezvous_transport.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <list>
#include <map>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

namespace {

// One control message. Announce: a send of `bytes` with `tag` waits as `id` on the sender. Clear: the receiver
// posted the payload receive for `id`. Refuse: the receiver posted `bytes` instead (both sides fail).
enum class Kind : uint32_t { Announce = 1, Clear = 2, Refuse = 3 };

struct Envelope {
    Kind kind = Kind::Announce;
    uint32_t reserved = 0;
    uint64_t tag = 0;
    uint64_t bytes = 0;
    uint64_t id = 0;
};

class TransportChannels : public ByteChannels {
public:
    TransportChannels(std::shared_ptr<Transport> transport, uint64_t tag) : transport_(std::move(transport)), tag_(tag) {}

    std::string describe() const override { return fmt::format("{} messages", transport_->name()); }
    void post_send(int peer, const void* buf, size_t bytes, Done done) override {
        ops_.push_back({transport_->isend(peer, tag_, buf, bytes), std::move(done)});
    }
    void post_recv(int peer, void* buf, size_t bytes, Done done) override {
        ops_.push_back({transport_->irecv(peer, tag_, buf, bytes), std::move(done)});
    }
    bool poll() override {
        bool any = false;
        for (auto it = ops_.begin(); it != ops_.end();) {
            if (!it->request->done()) {
                ++it;
                continue;
            }
            Done done = std::move(it->done);
            std::string error = it->request->error();
            it = ops_.erase(it);
            done(error);
            any = true;
        }
        return any;
    }
    void fail(int peer, const std::string& reason) override {
        for (auto it = ops_.begin(); it != ops_.end();) {
            if (peer >= 0 && it->request->peer != peer) {
                ++it;
                continue;
            }
            transport_->cancel(*it->request);
            Done done = std::move(it->done);
            it = ops_.erase(it);
            done(reason);
        }
    }

private:
    struct Op {
        std::shared_ptr<Request> request;
        Done done;
    };
    std::shared_ptr<Transport> transport_;
    uint64_t tag_;
    std::list<Op> ops_;
};

}  // namespace

std::shared_ptr<ByteChannels> make_transport_channels(std::shared_ptr<Transport> transport, uint64_t tag) {
    if (tag == RendezvousTransport::kControlTag)
        throw ConfigError("channel tag", fmt::format("{} is the rendezvous control tag", tag));
    return std::make_shared<TransportChannels>(std::move(transport), tag);
}

struct RendezvousTransport::State {
    struct Send {
        std::shared_ptr<Request> request;
        const void* buf = nullptr;
    };
    struct Recv {
        std::shared_ptr<Request> request;
        void* buf = nullptr;
    };
    struct Announced {
        uint64_t tag, bytes, id;
    };
    struct Outgoing {
        Envelope envelope;
        std::shared_ptr<Request> request;
    };

    State(std::shared_ptr<Transport> control, std::shared_ptr<ByteChannels> channels)
        : control(std::move(control)), channels(std::move(channels)), me(this->control->rank()),
          n(this->control->size()), recvs(n), announced(n), inbox(n), inbox_request(n), lost(n), channel_failed(n, false) {}

    std::shared_ptr<Transport> control;
    std::shared_ptr<ByteChannels> channels;
    const int me, n;

    std::mutex mutex;
    std::condition_variable wake;
    bool stop = false;
    std::string aborted;                         // why this rank gave up ("" while it has not)
    uint64_t next_id = 1;
    std::map<uint64_t, Send> sends;              // announced, waiting for Clear
    std::deque<Recv> posted;                     // receives the progress thread has not looked at yet
    std::vector<std::deque<Recv>> recvs;         // per peer: unmatched receives in posting order
    std::vector<std::deque<Announced>> announced;  // per peer: unmatched announcements in arrival order
    std::map<const Request*, std::shared_ptr<Request>> in_flight;  // payload posted on a channel
    std::vector<Envelope> inbox;
    std::vector<std::shared_ptr<Request>> inbox_request;
    std::list<Outgoing> outbox;
    std::vector<std::string> lost;               // per peer: why it is gone ("" while it is not)
    std::vector<bool> channel_failed;            // per peer: its channel transfers were failed
    std::thread thread;

    // Under `mutex`.
    void send_control(int peer, Kind kind, uint64_t tag, uint64_t bytes, uint64_t id) {
        outbox.push_back({Envelope{kind, 0, tag, bytes, id}, nullptr});
        Outgoing& o = outbox.back();
        o.request = control->isend(peer, kControlTag, &o.envelope, sizeof(Envelope));
    }

    // Under `mutex`, on the progress thread: a receive meets its announcement.
    void match(int peer, Recv recv, const Announced& a) {
        if (a.bytes != recv.request->bytes) {
            recv.request->complete(size_mismatch_error(peer, fmt::format("{} bytes", a.bytes), me, recv.request->bytes));
            send_control(peer, Kind::Refuse, a.tag, recv.request->bytes, a.id);
            return;
        }
        // The payload receive is posted before the Clear goes out: the channel's order is the order of the Clears.
        if (a.bytes > 0) post(recv.request, [&](ByteChannels::Done done) {
            channels->post_recv(peer, recv.buf, a.bytes, std::move(done));
        });
        else recv.request->complete();
        send_control(peer, Kind::Clear, a.tag, a.bytes, a.id);
    }

    // Under `mutex`: hands a request's payload to a channel; the channel's completion finishes the request.
    template <typename PostFn>
    void post(const std::shared_ptr<Request>& request, PostFn&& post_fn) {
        in_flight[request.get()] = request;
        post_fn([this, raw = request.get()](const std::string& error) {
            std::shared_ptr<Request> r;
            {
                std::lock_guard<std::mutex> lock(mutex);
                auto it = in_flight.find(raw);
                if (it != in_flight.end()) {
                    r = it->second;
                    in_flight.erase(it);
                }
            }
            if (r) r->complete(error);
        });
    }

    // Under `mutex`, on the progress thread.
    void on_control(int peer, const Envelope& e) {
        switch (e.kind) {
            case Kind::Announce: {
                auto& q = recvs[peer];
                auto it = std::find_if(q.begin(), q.end(), [&](const Recv& r) { return r.request->tag == e.tag; });
                if (it == q.end()) {
                    announced[peer].push_back({e.tag, e.bytes, e.id});
                    return;
                }
                Recv r = std::move(*it);
                q.erase(it);
                match(peer, std::move(r), {e.tag, e.bytes, e.id});
                return;
            }
            case Kind::Clear:
            case Kind::Refuse: {
                auto it = sends.find(e.id);
                if (it == sends.end()) return;  // failed here meanwhile (abort); the receiver learns it on its own
                Send s = std::move(it->second);
                sends.erase(it);
                if (e.kind == Kind::Refuse) {
                    s.request->complete(size_mismatch_error(me, fmt::format("{} bytes", s.request->bytes), peer, e.bytes));
                } else if (s.request->bytes > 0) {
                    post(s.request, [&](ByteChannels::Done done) {
                        channels->post_send(peer, s.buf, s.request->bytes, std::move(done));
                    });
                } else {
                    s.request->complete();
                }
                return;
            }
        }
        fail_peer(peer, fmt::format("rank {}: malformed control message from rank {}", me, peer));
    }

    // Under `mutex`: peer is gone; everything waiting on it fails with `why`.
    void fail_peer(int peer, const std::string& why) {
        if (!lost[peer].empty()) return;
        lost[peer] = why;
        for (auto it = sends.begin(); it != sends.end();) {
            if (it->second.request->peer == peer) {
                it->second.request->complete(why);
                it = sends.erase(it);
            } else {
                ++it;
            }
        }
        for (Recv& r : recvs[peer]) r.request->complete(why);
        recvs[peer].clear();
        announced[peer].clear();
    }

    void post_inbox(int peer) {
        inbox_request[peer] = control->irecv(peer, kControlTag, &inbox[peer], sizeof(Envelope));
    }

    // One pass of the progress thread; true if it found work.
    bool progress() {
        bool busy = false;
        std::vector<std::pair<int, std::string>> gone;  // peers lost since the last pass, and why
        {
            std::lock_guard<std::mutex> lock(mutex);
            while (!posted.empty()) {
                Recv r = std::move(posted.front());
                posted.pop_front();
                busy = true;
                int peer = r.request->peer;
                if (r.request->done()) continue;  // cancelled before it was looked at
                if (!lost[peer].empty()) {
                    r.request->complete(lost[peer]);
                    continue;
                }
                auto& q = announced[peer];
                auto it = std::find_if(q.begin(), q.end(), [&](const Announced& a) { return a.tag == r.request->tag; });
                if (it == q.end()) {
                    recvs[peer].push_back(std::move(r));
                    continue;
                }
                Announced a = *it;
                q.erase(it);
                match(peer, std::move(r), a);
            }
            for (int p = 0; p < n; ++p) {
                auto& req = inbox_request[p];
                if (!req || !req->done()) continue;
                busy = true;
                std::string error = req->error();
                if (!error.empty()) {
                    req.reset();
                    fail_peer(p, error);
                    continue;
                }
                Envelope e = inbox[p];
                post_inbox(p);
                on_control(p, e);
            }
            for (auto it = outbox.begin(); it != outbox.end();) {
                if (!it->request->done()) {
                    ++it;
                    continue;
                }
                std::string error = it->request->error();
                if (!error.empty()) fail_peer(static_cast<int>(it->request->peer), error);
                it = outbox.erase(it);
            }
            for (int p = 0; p < n; ++p)
                if (!lost[p].empty() && !channel_failed[p]) {
                    channel_failed[p] = true;
                    gone.emplace_back(p, lost[p]);
                }
        }
        // Outside the lock (the channels' completions take it): in-flight payloads with a lost peer fail.
        for (auto& [p, why] : gone) channels->fail(p, why);
        return channels->poll() || busy || !gone.empty();
    }

    // This rank gives up: the control transport tells the peers, and everything here fails with `reason`.
    void give_up(const std::string& reason) {
        std::string why = fmt::format("rank {} failed: {}", me, reason);
        {
            std::lock_guard<std::mutex> lock(mutex);
            if (!aborted.empty()) return;
            aborted = why;
        }
        control->abort(reason);
        std::lock_guard<std::mutex> lock(mutex);
        for (int p = 0; p < n; ++p) fail_peer(p, why);
        for (auto& r : posted) r.request->complete(why);
        posted.clear();
    }

    void run() {
        int idle = 0;
        while (true) {
            {
                std::lock_guard<std::mutex> lock(mutex);
                if (stop) return;
            }
            bool busy = false;
            try {
                busy = progress();
            } catch (const std::exception& e) {
                give_up(fmt::format("rendezvous progress: {}", e.what()));
                busy = true;
            }
            if (busy) {
                idle = 0;
                continue;
            }
            // Nothing moved: back off from 10 us to 200 us; a new receive wakes it at once (a send needs no progress
            // here until its Clear arrives).
            auto pause = std::chrono::microseconds(std::min(200, 10 << std::min(idle++, 5)));
            std::unique_lock<std::mutex> lock(mutex);
            wake.wait_for(lock, pause, [&] { return stop || !posted.empty(); });
        }
    }
};

RendezvousTransport::RendezvousTransport(std::shared_ptr<Transport> control, std::shared_ptr<ByteChannels> channels,
                                         std::string name)
    : control_(control), channels_(channels), name_(std::move(name)),
      state_(std::make_shared<State>(std::move(control), std::move(channels))) {
    for (int p = 0; p < state_->n; ++p) state_->post_inbox(p);
    state_->thread = std::thread([s = state_.get()] { s->run(); });
}

RendezvousTransport::~RendezvousTransport() {
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        state_->stop = true;
    }
    state_->wake.notify_all();
    state_->thread.join();
    for (auto& r : state_->inbox_request)
        if (r) control_->cancel(*r);
    for (auto& o : state_->outbox) control_->cancel(*o.request);  // their envelopes go with the state
    channels_->fail(-1, fmt::format("rank {}: transport closed", state_->me));
}

namespace {

std::shared_ptr<Request> new_request(const Transport& t, int peer, uint64_t tag, size_t bytes, bool is_send) {
    if (peer < 0 || peer >= t.size())
        throw CommError(fmt::format("{}: peer {} outside 0..{}", comm_context(t.rank(), is_send ? "isend" : "irecv"), peer,
                                    t.size() - 1));
    return std::make_shared<Request>(peer, tag, bytes, is_send);
}

}  // namespace

std::shared_ptr<Request> RendezvousTransport::isend(int peer, uint64_t tag, const void* buf, size_t bytes) {
    auto request = new_request(*this, peer, tag, bytes, true);
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (!state_->aborted.empty()) {
        request->complete(state_->aborted);
    } else if (!state_->lost[peer].empty()) {
        request->complete(state_->lost[peer]);
    } else {
        uint64_t id = state_->next_id++;
        state_->sends[id] = {request, buf};
        state_->send_control(peer, Kind::Announce, tag, bytes, id);
    }
    return request;
}

std::shared_ptr<Request> RendezvousTransport::irecv(int peer, uint64_t tag, void* buf, size_t bytes) {
    auto request = new_request(*this, peer, tag, bytes, false);
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        if (!state_->aborted.empty()) {
            request->complete(state_->aborted);
            return request;
        }
        state_->posted.push_back({request, buf});
    }
    state_->wake.notify_all();
    return request;
}

void RendezvousTransport::cancel(Request& request) {
    if (request.done()) return;
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        if (!request.is_send) {
            // Not yet matched: withdraw it (the progress thread skips a completed one it has not looked at yet).
            auto& q = state_->recvs[request.peer];
            auto it = std::find_if(q.begin(), q.end(), [&](const State::Recv& r) { return r.request.get() == &request; });
            bool waiting = it != q.end() || std::any_of(state_->posted.begin(), state_->posted.end(), [&](const State::Recv& r) {
                               return r.request.get() == &request;
                           });
            if (it != q.end()) q.erase(it);
            if (waiting) {
                request.complete(fmt::format("rank {}: receive cancelled", rank()));
                return;
            }
        }
    }
    // A send is announced at once and a matched receive has its payload posted on a channel: neither can be taken
    // back without breaking the channel's order, so this rank gives up.
    abort(fmt::format("{} {} rank {} (tag {}) cancelled after it was matched", request.is_send ? "send to" : "receive from",
                      request.bytes, request.peer, request.tag));
}

void RendezvousTransport::abort(const std::string& reason) { state_->give_up(reason); }

std::string RendezvousTransport::describe() const {
    return fmt::format("{} (payloads over {}, control over {})", name_, channels_->describe(), control_->describe());
}

}  // namespace duplex
