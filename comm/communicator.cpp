#include "comm/communicator.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "comm/collective_worker.hpp"
#include "core/error.hpp"
#include "core/knobs.hpp"
#include "core/log.hpp"

namespace duplex {

namespace {

const Knob<double> kCommTimeout("DUPLEX_COMM_TIMEOUT", 300.0,
                                "seconds a communication operation may wait for a peer before TimeoutError");
const Knob<std::string> kSlowPair("DUPLEX_TEST_SLOW_PAIR", "",
                                  "tests only: FROM:TO:MICROSECONDS delays every point-to-point send from world rank "
                                  "FROM to world rank TO by that long before it is posted (a slow link, for checking "
                                  "that `duplex commbench --op pairs` names it); empty: none");

struct SlowLink {
    int from = -1, to = -1;
    double us = 0;
};

// The DUPLEX_TEST_SLOW_PAIR link, read once per process.
const SlowLink& slow_link() {
    static const SlowLink link = [] {
        SlowLink p;
        std::string text = kSlowPair.get();
        if (text.empty()) return p;
        if (std::sscanf(text.c_str(), "%d:%d:%lf", &p.from, &p.to, &p.us) != 3 || p.from < 0 || p.to < 0 || p.us < 0)
            throw ConfigError("DUPLEX_TEST_SLOW_PAIR", fmt::format("'{}' is not FROM:TO:MICROSECONDS", text));
        return p;
    }();
    return link;
}
}  // namespace

double default_comm_timeout() { return kCommTimeout.get(); }

namespace {

// Point-to-point work: the transport request itself. What a timeout names is formatted only then (a message of
// a few bytes costs less than formatting it would).
class P2PWork : public Work {
public:
    struct Context {
        int rank, peer;
        const char* op;
        uint32_t tag;
        size_t bytes;
    };
    P2PWork(std::shared_ptr<Transport> t, std::shared_ptr<Request> r, Context context, double default_timeout)
        : transport_(std::move(t)), request_(std::move(r)), context_(context), timeout_(default_timeout) {}
    bool test() override {
        if (!request_->done()) return false;
        request_->rethrow();
        return true;
    }
    void wait(double timeout_s) override {
        if (request_->done()) {  // (without reading the clock for a deadline)
            request_->rethrow();
            return;
        }
        double t = timeout_s < 0 ? timeout_ : timeout_s;
        if (!transport_->wait(*request_, Deadline(t))) {
            transport_->cancel(*request_);
            try {
                request_->rethrow();
            } catch (const CommError&) {
                throw TimeoutError(fmt::format("{} (tag {}, {} bytes)", comm_context(context_.rank, context_.op, context_.peer),
                                               context_.tag, context_.bytes), t);
            }
            return;  // it completed while being cancelled
        }
        request_->rethrow();
    }

private:
    std::shared_ptr<Transport> transport_;
    std::shared_ptr<Request> request_;
    Context context_;
    double timeout_;
};


uint32_t mix_context(uint32_t parent, uint32_t seq) {
    uint64_t x = (uint64_t(parent) << 32) ^ (seq + 0x9E3779B97F4A7C15ull);
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDull;
    x ^= x >> 33;
    // NOTE: contexts are 16 bits (8 on MPI) and never 0 (the world); a collision only matters when two groups
    // sharing a pair of ranks have operations in flight at once with equal tags.
    return static_cast<uint32_t>(x % 0xFFFFu) + 1;
}

}  // namespace

void CompletableWork::finish(std::exception_ptr error) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        done_ = true;
        error_ = std::move(error);
    }
    cv_.notify_all();
}

bool CompletableWork::test() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_ && error_) std::rethrow_exception(error_);
    return done_;
}

bool CompletableWork::wait_finished(const Deadline& deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (deadline.infinite())
        cv_.wait(lock, [&] { return done_; });
    else if (!cv_.wait_until(lock, deadline.at(), [&] { return done_; }))
        return false;
    if (error_) std::rethrow_exception(error_);
    return true;
}

// Collective work: completed by the communicator's worker thread.
class CollectiveWork : public CompletableWork {
public:
    CollectiveWork(int rank, const char* op, std::shared_ptr<Communicator::Worker> worker)
        : rank_(rank), op_(op), worker_(std::move(worker)) {}
    void set_id(uint64_t id) { id_ = id; }
    void wait(double timeout_s) override {
        // NOTE: by default wait for the worker: the collective has its own deadline and its error names the
        // peer that did not answer, which a second, racing deadline here would hide.
        double t = timeout_s < 0 ? 0 : timeout_s;
        Deadline deadline(t);
        if (!test()) worker_->try_run_inline(id_);
        if (!wait_finished(deadline)) throw TimeoutError(comm_context(rank_, op_), t);
    }

private:
    int rank_;
    const char* op_;
    std::shared_ptr<Communicator::Worker> worker_;
    uint64_t id_ = 0;
};

// What a collective's body sees: posting in group ranks, waiting with the collective's deadline.
struct CollectiveCtx {
    Communicator& comm;
    const char* op;
    uint32_t seq;
    Deadline deadline;

    // A round's messages in group ranks: collected, then posted together (post) and waited on together (wait).
    Message send(int peer, int phase, const void* buf, size_t bytes) const {
        comm.count_send(peer, bytes);
        return {comm.world_rank(peer), tag(phase), const_cast<void*>(buf), bytes, true};
    }
    Message recv(int peer, int phase, void* buf, size_t bytes) const {
        return {comm.world_rank(peer), tag(phase), buf, bytes, false};
    }
    uint64_t tag(int phase) const { return comm.wire_tag(true, (seq << 3) | static_cast<uint32_t>(phase)); }

    std::unique_ptr<MessageBatch> post(std::vector<Message> messages) const {
        return comm.transport_->post(std::move(messages));
    }
    // Waits for a posted round. A timeout or a failed message withdraws the rest before the error propagates (the
    // caller then frees their buffers); a timeout names the first peer that did not answer.
    void wait(MessageBatch& round) const {
        int late = round.wait(deadline);
        if (late < 0) return;
        const Message& m = round.messages()[late];
        auto member = std::find(comm.members_.begin(), comm.members_.end(), m.peer);
        auto peer = static_cast<int>(member - comm.members_.begin());
        throw TimeoutError(fmt::format("{} ({} {} bytes)", comm_context(comm.rank(), op, peer),
                                       m.is_send ? "sending" : "receiving", m.bytes),
                           deadline.timeout_s());
    }
};

void wait_all(const std::vector<WorkPtr>& works, double timeout_s) {
    for (const WorkPtr& w : works) w->wait(timeout_s);
}

std::shared_ptr<Communicator> Communicator::create(std::shared_ptr<Transport> transport, Topology topology,
                                                   CommOptions options) {
    int n = transport->size();
    if (topology.size() != n)
        throw ConfigError("topology", fmt::format("describes {} ranks but the world has {}", topology.size(), n));
    std::vector<int> members(n);
    for (int r = 0; r < n; ++r) members[r] = r;
    double timeout = options.timeout_s < 0 ? kCommTimeout.get() : options.timeout_s;
    return std::shared_ptr<Communicator>(
        new Communicator(std::move(transport), std::move(topology), std::move(members), 0, timeout));
}

Communicator::Communicator(std::shared_ptr<Transport> transport, Topology world, std::vector<int> members,
                           uint32_t context, double timeout_s)
    : transport_(std::move(transport)),
      world_topology_(std::move(world)),
      topology_(world_topology_.subset(members)),
      members_(std::move(members)),
      context_(context),
      timeout_s_(timeout_s),
      worker_(std::make_shared<Worker>()) {
    int me = transport_->rank();
    auto it = std::find(members_.begin(), members_.end(), me);
    if (it == members_.end()) throw Error(fmt::format("rank {} is not a member of its own communicator", me));
    rank_ = static_cast<int>(it - members_.begin());
}

Communicator::~Communicator() { worker_->shutdown(); }

uint64_t Communicator::wire_tag(bool collective, uint32_t tag) const {
    return (uint64_t(context_) << 33) | (uint64_t(collective ? 1 : 0) << 32) | tag;
}

void Communicator::count_send(int peer, size_t bytes) {
    LinkClass c = topology_.link(rank_, peer);
    sent_bytes_[static_cast<int>(c)].fetch_add(bytes, std::memory_order_relaxed);
}

LinkBytes Communicator::bytes_sent() const {
    return {sent_bytes_[static_cast<int>(LinkClass::IntraNode)].load(),
            sent_bytes_[static_cast<int>(LinkClass::InterNode)].load()};
}

void Communicator::reset_counters() {
    for (auto& c : sent_bytes_) c.store(0);
}

WorkPtr Communicator::isend(const void* buf, size_t bytes, int peer, uint32_t tag) {
    DUPLEX_CHECK_ARG(peer >= 0 && peer < size(), "isend peer", "rank {}: peer {} outside 0..{}", rank_, peer, size() - 1);
    DUPLEX_CHECK_ARG(tag < kMaxUserTag, "isend tag", "rank {}: tag {} must be below {}", rank_, tag, kMaxUserTag);
    count_send(peer, bytes);
    if (const SlowLink& slow = slow_link(); slow.from == world_rank(rank_) && slow.to == world_rank(peer))
        std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(slow.us));
    auto r = transport_->isend(world_rank(peer), wire_tag(false, tag), buf, bytes);
    return std::make_shared<P2PWork>(transport_, std::move(r), P2PWork::Context{rank_, peer, "isend", tag, bytes},
                                     timeout_s_);
}

WorkPtr Communicator::irecv(void* buf, size_t bytes, int peer, uint32_t tag) {
    DUPLEX_CHECK_ARG(peer >= 0 && peer < size(), "irecv peer", "rank {}: peer {} outside 0..{}", rank_, peer, size() - 1);
    DUPLEX_CHECK_ARG(tag < kMaxUserTag, "irecv tag", "rank {}: tag {} must be below {}", rank_, tag, kMaxUserTag);
    auto r = transport_->irecv(world_rank(peer), wire_tag(false, tag), buf, bytes);
    return std::make_shared<P2PWork>(transport_, std::move(r), P2PWork::Context{rank_, peer, "irecv", tag, bytes},
                                     timeout_s_);
}

WorkPtr Communicator::enqueue(const char* op, std::function<void(const CollectiveCtx&)> body) {
    uint32_t seq = collective_seq_++;
    auto work = std::make_shared<CollectiveWork>(rank_, op, worker_);
    // NOTE: `this` outlives the task: ~Communicator drains the worker's queue before it returns.
    uint64_t id = worker_->push([this, work, op, seq, body = std::move(body)] {
        try {
            CollectiveCtx ctx{*this, op, seq, Deadline(timeout_s_)};
            body(ctx);
            work->finish(nullptr);
        } catch (...) {
            work->finish(std::current_exception());
        }
    });
    work->set_id(id);
    return work;
}

namespace {

template <typename T>
void add_into(T* dst, const T* src, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Posts receives from every peer, then sends in a rotated order (rank+1, rank+2, ...) so that no rank is
// everyone's first target; the block to self is a local copy.
void exchange_blocks(const CollectiveCtx& ctx, int phase, const char* send, std::span<const size_t> send_bytes,
                     std::span<const size_t> send_off, char* recv, std::span<const size_t> recv_bytes,
                     std::span<const size_t> recv_off) {
    int n = ctx.comm.size(), me = ctx.comm.rank();
    if (send_bytes[me] != recv_bytes[me])  // before posting anything: nothing left in flight into the caller's buffers
        throw CommError(fmt::format("{}: sends {} bytes to itself but expects {}", comm_context(me, ctx.op),
                                    send_bytes[me], recv_bytes[me]));
    std::vector<Message> messages;
    messages.reserve(2 * size_t(n));
    for (int i = 1; i < n; ++i) {
        int peer = (me - i + n) % n;
        messages.push_back(ctx.recv(peer, phase, recv + recv_off[peer], recv_bytes[peer]));
    }
    for (int i = 1; i < n; ++i) {
        int peer = (me + i) % n;
        messages.push_back(ctx.send(peer, phase, send + send_off[peer], send_bytes[peer]));
    }
    auto round = ctx.post(std::move(messages));
    if (send_bytes[me] > 0 && send + send_off[me] != recv + recv_off[me])
        std::memmove(recv + recv_off[me], send + send_off[me], send_bytes[me]);
    ctx.wait(*round);
}

// Sum of the blocks that land on each rank: block p of rank q (counts[p] elements at offsets[p]) is added
// into rank p's `out` in rank order q = 0..n-1.
void reduce_scatter_blocks(const CollectiveCtx& ctx, int phase, const char* send, char* out,
                           const std::vector<size_t>& counts, const std::vector<size_t>& offsets, DType dtype) {
    int n = ctx.comm.size(), me = ctx.comm.rank();
    size_t esize = dtype_size(dtype);
    size_t mine = counts[me];
    std::vector<char> scratch(mine * esize * static_cast<size_t>(n));
    std::vector<Message> messages;
    messages.reserve(2 * size_t(n));
    for (int i = 1; i < n; ++i) {
        int peer = (me - i + n) % n;
        messages.push_back(ctx.recv(peer, phase, scratch.data() + size_t(peer) * mine * esize, mine * esize));
    }
    for (int i = 1; i < n; ++i) {
        int peer = (me + i) % n;
        messages.push_back(ctx.send(peer, phase, send + offsets[peer] * esize, counts[peer] * esize));
    }
    auto round = ctx.post(std::move(messages));
    if (mine > 0) std::memcpy(scratch.data() + size_t(me) * mine * esize, send + offsets[me] * esize, mine * esize);
    ctx.wait(*round);
    if (dtype == DType::BF16) {
        std::vector<float> acc(mine, 0.0f);
        for (int q = 0; q < n; ++q) {
            auto src = reinterpret_cast<const uint16_t*>(scratch.data() + size_t(q) * mine * esize);
            for (size_t i = 0; i < mine; ++i) acc[i] += bf16_to_fp32(src[i]);
        }
        auto dst = reinterpret_cast<uint16_t*>(out);
        for (size_t i = 0; i < mine; ++i) dst[i] = fp32_to_bf16(acc[i]);
        return;
    }
    if (mine == 0) return;
    std::memcpy(out, scratch.data(), mine * esize);
    for (int q = 1; q < n; ++q) reduce_sum_into(out, scratch.data() + size_t(q) * mine * esize, mine, dtype);
}

std::vector<size_t> even_split(size_t count, int n, std::vector<size_t>& offsets) {
    std::vector<size_t> counts(n);
    offsets.assign(n, 0);
    for (int i = 0; i < n; ++i) {
        counts[i] = count / n + (size_t(i) < count % n ? 1 : 0);
        if (i > 0) offsets[i] = offsets[i - 1] + counts[i - 1];
    }
    return counts;
}

void check_reduce_dtype(DType dtype, int rank, const char* op) {
    if (dtype == DType::E4M3 || dtype == DType::U8)
        throw ConfigError(fmt::format("{} dtype", op),
                          fmt::format("rank {}: cannot sum {} (use float, double, bf16, int32, int64)", rank,
                                      dtype_name(dtype)));
}

}  // namespace

void reduce_sum_into(void* dst, const void* src, size_t count, DType dtype) {
    switch (dtype) {
        case DType::F32: add_into(static_cast<float*>(dst), static_cast<const float*>(src), count); break;
        case DType::F64: add_into(static_cast<double*>(dst), static_cast<const double*>(src), count); break;
        case DType::I32: add_into(static_cast<int32_t*>(dst), static_cast<const int32_t*>(src), count); break;
        case DType::I64: add_into(static_cast<int64_t*>(dst), static_cast<const int64_t*>(src), count); break;
        case DType::BF16: {
            auto d = static_cast<uint16_t*>(dst);
            auto s = static_cast<const uint16_t*>(src);
            for (size_t i = 0; i < count; ++i) d[i] = fp32_to_bf16(bf16_to_fp32(d[i]) + bf16_to_fp32(s[i]));
            break;
        }
        default:
            throw ConfigError("reduce dtype", fmt::format("cannot sum {}", dtype_name(dtype)));
    }
}

void Communicator::check_host_buffers(const char* op, const void* send, const void* recv) const {
    if ((send && transport_->device_memory(send)) || (recv && transport_->device_memory(recv)))
        throw ConfigError(fmt::format("{} buffer", op),
                          fmt::format("rank {}: device memory; the Communicator's collectives copy and add on the host "
                                      "(pass host buffers, or run device collectives with NcclCommunicator)",
                                      rank_));
}

WorkPtr Communicator::all_to_all_v(const void* send, std::span<const size_t> send_bytes,
                                   std::span<const size_t> send_offsets, void* recv, std::span<const size_t> recv_bytes,
                                   std::span<const size_t> recv_offsets) {
    check_host_buffers("all_to_all_v", send, recv);
    size_t n = static_cast<size_t>(size());
    if (send_bytes.size() != n || send_offsets.size() != n || recv_bytes.size() != n || recv_offsets.size() != n)
        throw ConfigError("all_to_all_v counts",
                          fmt::format("rank {}: need {} entries per list, got send {}/{} recv {}/{}", rank_, n,
                                      send_bytes.size(), send_offsets.size(), recv_bytes.size(), recv_offsets.size()));
    // The four lists in one allocation, moved into the task (a small exchange costs about as much as a few copies).
    std::vector<size_t> layout;
    layout.reserve(4 * n);
    for (auto list : {send_bytes, send_offsets, recv_bytes, recv_offsets})
        layout.insert(layout.end(), list.begin(), list.end());
    return enqueue_exchange("all_to_all_v", send, recv, std::move(layout));
}

WorkPtr Communicator::all_to_all(const void* send, void* recv, size_t bytes_per_peer) {
    check_host_buffers("all_to_all", send, recv);
    size_t n = static_cast<size_t>(size());
    std::vector<size_t> layout(4 * n, bytes_per_peer);
    for (size_t i = 0; i < n; ++i) layout[n + i] = layout[3 * n + i] = i * bytes_per_peer;
    return enqueue_exchange("all_to_all", send, recv, std::move(layout));
}

WorkPtr Communicator::enqueue_exchange(const char* op, const void* send, void* recv, std::vector<size_t> layout) {
    auto s = static_cast<const char*>(send);
    auto r = static_cast<char*>(recv);
    return enqueue(op, [s, r, layout = std::move(layout)](const CollectiveCtx& ctx) {
        std::span<const size_t> l(layout);
        size_t n = l.size() / 4;
        exchange_blocks(ctx, 0, s, l.first(n), l.subspan(n, n), r, l.subspan(2 * n, n), l.subspan(3 * n, n));
    });
}

WorkPtr Communicator::all_gather(const void* send, void* recv, size_t bytes) {
    check_host_buffers("all_gather", send, recv);
    int n = size();
    auto s = static_cast<const char*>(send);
    auto r = static_cast<char*>(recv);
    return enqueue("all_gather", [=](const CollectiveCtx& ctx) {
        // Own block goes to everyone: every send "block" starts at `s`; the self block is copied here.
        std::vector<size_t> sb(n, bytes), so(n, 0), rb(n, bytes), ro(n);
        for (int i = 0; i < n; ++i) ro[i] = size_t(i) * bytes;
        int me = ctx.comm.rank();
        if (bytes > 0) std::memmove(r + ro[me], s, bytes);
        sb[me] = rb[me] = 0;
        exchange_blocks(ctx, 0, s, sb, so, r, rb, ro);
    });
}

WorkPtr Communicator::reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp) {
    check_reduce_dtype(dtype, rank_, "reduce_scatter");
    check_host_buffers("reduce_scatter", send, recv);
    int n = size();
    auto s = static_cast<const char*>(send);
    auto r = static_cast<char*>(recv);
    return enqueue("reduce_scatter", [=](const CollectiveCtx& ctx) {
        if (n == 1) {  // one block, this rank's own
            if (count > 0 && s != r) std::memmove(r, s, count * dtype_size(dtype));
            return;
        }
        std::vector<size_t> counts(n, count), offsets(n);
        for (int i = 0; i < n; ++i) offsets[i] = size_t(i) * count;
        reduce_scatter_blocks(ctx, 0, s, r, counts, offsets, dtype);
    });
}

WorkPtr Communicator::all_reduce(void* buf, size_t count, DType dtype, ReduceOp) {
    check_reduce_dtype(dtype, rank_, "all_reduce");
    check_host_buffers("all_reduce", buf, nullptr);
    int n = size();
    auto b = static_cast<char*>(buf);
    return enqueue("all_reduce", [=](const CollectiveCtx& ctx) {
        if (n == 1) return;  // the sum of one rank's values (queued all the same: it completes in order)
        std::vector<size_t> offsets;
        std::vector<size_t> counts = even_split(count, n, offsets);
        size_t esize = dtype_size(dtype);
        int me = ctx.comm.rank();
        std::vector<char> mine(counts[me] * esize);
        reduce_scatter_blocks(ctx, 0, b, mine.data(), counts, offsets, dtype);
        if (!mine.empty()) std::memcpy(b + offsets[me] * esize, mine.data(), mine.size());
        std::vector<size_t> bytes(n), boff(n), sb(n, counts[me] * esize), so(n, offsets[me] * esize);
        for (int i = 0; i < n; ++i) {
            bytes[i] = counts[i] * esize;
            boff[i] = offsets[i] * esize;
        }
        exchange_blocks(ctx, 1, b, sb, so, b, bytes, boff);
    });
}

WorkPtr Communicator::barrier() {
    return enqueue("barrier", [](const CollectiveCtx& ctx) {
        // Dissemination barrier: ceil(log2 n) rounds of empty messages.
        int n = ctx.comm.size(), me = ctx.comm.rank();
        for (int dist = 1, round = 0; dist < n; dist *= 2, ++round) {
            int from = (me - dist + n) % n, to = (me + dist) % n;
            auto posted = ctx.post({ctx.recv(from, round, nullptr, 0), ctx.send(to, round, nullptr, 0)});
            ctx.wait(*posted);
        }
    });
}

std::shared_ptr<Communicator> Communicator::split(int color, int key) {
    int n = size();
    std::vector<int32_t> mine = {color, key, rank_}, all(3 * size_t(n));
    all_gather(mine.data(), all.data(), sizeof(int32_t) * 3)->wait();
    uint32_t child_context = mix_context(context_, split_seq_++);
    if (color < 0) return nullptr;
    std::vector<std::pair<std::pair<int, int>, int>> group;  // ((key, rank), rank)
    for (int r = 0; r < n; ++r)
        if (all[3 * r] == color) group.push_back({{all[3 * r + 1], all[3 * r + 2]}, r});
    std::sort(group.begin(), group.end());
    std::vector<int> members;
    for (auto& g : group) members.push_back(members_[g.second]);
    log::debug("comm", "rank {}: split color {} -> group of {} (context {})", rank_, color, members.size(),
               child_context);
    return std::shared_ptr<Communicator>(
        new Communicator(transport_, world_topology_, std::move(members), child_context, timeout_s_));
}

}  // namespace duplex

namespace duplex {

std::vector<std::string> gather_strings(Communicator& comm, const std::string& mine, int root) {
    constexpr uint32_t kTag = kMaxUserTag - 1;
    std::vector<uint64_t> sizes(comm.size());
    uint64_t my = mine.size();
    comm.all_gather(&my, sizes.data(), sizeof(uint64_t))->wait();
    std::vector<std::string> out;
    if (comm.rank() != root) {
        comm.isend(mine.data(), mine.size(), root, kTag)->wait();
        return out;
    }
    out.resize(comm.size());
    std::vector<WorkPtr> works;
    for (int r = 0; r < comm.size(); ++r) {
        if (r == root) {
            out[r] = mine;
            continue;
        }
        out[r].resize(sizes[r]);
        works.push_back(comm.irecv(out[r].data(), sizes[r], r, kTag));
    }
    wait_all(works);
    return out;
}

}  // namespace duplex
