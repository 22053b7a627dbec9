// Checks of every Communicator operation against a straightforward reference, shared by the in-process
// suite (ranks as threads) and the multi-process one (ranks under mpirun). Each returns "" on success or
// a description of the first mismatch, so both suites can assert on it from any thread.
#pragma once

#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "comm/communicator.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex::testing {

inline const std::vector<size_t> kMessageSizes = {0, 1, 7, 4096, (1u << 20) + 3};
inline const std::vector<std::string> kOps = {"p2p", "all_to_all_v", "all_gather", "reduce_scatter", "all_reduce"};

inline uint8_t pattern(int src, int dst, size_t i) {
    uint32_t x = uint32_t(src + 1) * 0x9E3779B1u ^ uint32_t(dst + 7) * 0x85EBCA77u ^ uint32_t(i) * 0x27D4EB2Fu;
    return uint8_t(x ^ (x >> 13) ^ (x >> 24));
}
inline float rand_value(int src, size_t i) {
    uint32_t x = uint32_t(src) * 0x9E3779B1u + uint32_t(i) * 0x85EBCA77u;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    return float(int(x % 2001) - 1000) / 997.0f;
}

// Where a check's buffers come from: the system allocator, or the communicator's (Communicator::allocate_host: UCX's
// shared arena, whose single-copy messages are copied out of a mapping instead of read with process_vm_readv).
enum class Buffers { Plain, Transport };

// `bytes` of host memory, every byte `fill`.
inline HostBuffer test_buffer(Communicator& c, size_t bytes, uint8_t fill, Buffers from) {
    HostBuffer b = from == Buffers::Transport ? c.allocate_host(bytes) : allocate_ordinary_host(bytes);
    if (bytes > 0) std::memset(b.data(), fill, bytes);
    return b;
}

// Bytes rank src sends rank dst in the uneven all-to-all: varies per pair, zero for some pairs.
inline size_t a2a_bytes(size_t base, int src, int dst) {
    if (base == 0) return 0;
    size_t extra = size_t((src * 3 + dst * 5) % 4);
    return (src + dst) % 3 == 2 ? 0 : base + extra;
}

inline std::string check_p2p(Communicator& c, size_t bytes, Buffers buffers = Buffers::Plain) {
    int n = c.size(), me = c.rank(), to = (me + 1) % n, from = (me - 1 + n) % n;
    HostBuffer send_memory = test_buffer(c, bytes, 0, buffers), recv_memory = test_buffer(c, bytes, 0xAB, buffers);
    auto send = send_memory.as<uint8_t>(), recv = recv_memory.as<uint8_t>();
    for (size_t i = 0; i < bytes; ++i) send[i] = pattern(me, to, i);
    auto r = c.irecv(recv.data(), bytes, from, 11);
    auto s = c.isend(send.data(), bytes, to, 11);
    s->wait();
    r->wait();
    for (size_t i = 0; i < bytes; ++i)
        if (recv[i] != pattern(from, me, i)) return fmt::format("rank {}: byte {} from {} wrong", me, i, from);
    return "";
}

inline std::string check_all_to_all_v(Communicator& c, size_t base, Buffers buffers = Buffers::Plain) {
    int n = c.size(), me = c.rank();
    std::vector<size_t> sb(n), so(n), rb(n), ro(n);
    size_t st = 0, rt = 0;
    // Receive blocks are laid out in reverse peer order to exercise arbitrary offsets.
    for (int p = 0; p < n; ++p) {
        sb[p] = a2a_bytes(base, me, p);
        so[p] = st;
        st += sb[p] + 1;  // a gap byte between blocks
    }
    for (int p = n - 1; p >= 0; --p) {
        rb[p] = a2a_bytes(base, p, me);
        ro[p] = rt;
        rt += rb[p];
    }
    HostBuffer send_memory = test_buffer(c, st, 0, buffers), recv_memory = test_buffer(c, rt, 0xCD, buffers);
    auto send = send_memory.as<uint8_t>(), recv = recv_memory.as<uint8_t>();
    for (int p = 0; p < n; ++p)
        for (size_t i = 0; i < sb[p]; ++i) send[so[p] + i] = pattern(me, p, i);
    c.all_to_all_v(send.data(), sb, so, recv.data(), rb, ro)->wait();
    for (int p = 0; p < n; ++p)
        for (size_t i = 0; i < rb[p]; ++i)
            if (recv[ro[p] + i] != pattern(p, me, i))
                return fmt::format("rank {}: all_to_all_v byte {} from {} wrong", me, i, p);
    return "";
}

inline std::string check_all_gather(Communicator& c, size_t bytes, Buffers buffers = Buffers::Plain) {
    int n = c.size(), me = c.rank();
    HostBuffer send_memory = test_buffer(c, bytes, 0, buffers), recv_memory = test_buffer(c, bytes * n, 0xEE, buffers);
    auto send = send_memory.as<uint8_t>(), recv = recv_memory.as<uint8_t>();
    for (size_t i = 0; i < bytes; ++i) send[i] = pattern(me, -1, i);
    c.all_gather(send.data(), recv.data(), bytes)->wait();
    for (int p = 0; p < n; ++p)
        for (size_t i = 0; i < bytes; ++i)
            if (recv[p * bytes + i] != pattern(p, -1, i))
                return fmt::format("rank {}: all_gather byte {} of block {} wrong", me, i, p);
    return "";
}

// Elements for the reductions: the small sizes as counts, the large ones as bytes of fp32.
inline size_t reduce_count(size_t size) { return size < 4096 ? size : size / 4; }

// The reference: values of ranks 0..n-1 added in rank order (fp32 accumulation for bf16).
inline float reference_sum(int n, size_t i, DType dtype) {
    float acc = 0;
    for (int r = 0; r < n; ++r) {
        float v = rand_value(r, i);
        if (dtype == DType::BF16) v = bf16_to_fp32(fp32_to_bf16(v));
        acc = (r == 0 && dtype == DType::F32) ? v : acc + v;
    }
    return dtype == DType::BF16 ? bf16_to_fp32(fp32_to_bf16(acc)) : acc;
}

inline void fill_values(void* buf, size_t count, size_t first, int rank, DType dtype) {
    for (size_t i = 0; i < count; ++i) {
        float v = rand_value(rank, first + i);
        if (dtype == DType::BF16) static_cast<uint16_t*>(buf)[i] = fp32_to_bf16(v);
        else static_cast<float*>(buf)[i] = v;
    }
}

inline float read_value(const void* buf, size_t i, DType dtype) {
    return dtype == DType::BF16 ? bf16_to_fp32(static_cast<const uint16_t*>(buf)[i]) : static_cast<const float*>(buf)[i];
}

inline std::string check_reduce_scatter(Communicator& c, size_t size, DType dtype, Buffers buffers = Buffers::Plain) {
    int n = c.size(), me = c.rank();
    size_t count = reduce_count(size), es = dtype_size(dtype);
    HostBuffer send_memory = test_buffer(c, count * n * es, 0, buffers), recv_memory = test_buffer(c, count * es + 1, 0, buffers);
    auto send = send_memory.as<char>(), recv = recv_memory.as<char>();
    fill_values(send.data(), count * n, 0, me, dtype);
    c.reduce_scatter(send.data(), recv.data(), count, dtype)->wait();
    for (size_t i = 0; i < count; ++i) {
        float want = reference_sum(n, size_t(me) * count + i, dtype), got = read_value(recv.data(), i, dtype);
        if (std::memcmp(&want, &got, 4) != 0)
            return fmt::format("rank {}: reduce_scatter {} element {}: {} != {}", me, dtype_name(dtype), i, got, want);
    }
    return "";
}

inline std::string check_all_reduce(Communicator& c, size_t size, DType dtype, Buffers buffers = Buffers::Plain) {
    int me = c.rank();
    size_t count = reduce_count(size), es = dtype_size(dtype);
    HostBuffer memory = test_buffer(c, count * es + 1, 0, buffers);
    auto buf = memory.as<char>();
    fill_values(buf.data(), count, 0, me, dtype);
    c.all_reduce(buf.data(), count, dtype)->wait();
    for (size_t i = 0; i < count; ++i) {
        float want = reference_sum(c.size(), i, dtype), got = read_value(buf.data(), i, dtype);
        if (std::memcmp(&want, &got, 4) != 0)
            return fmt::format("rank {}: all_reduce {} element {}: {} != {}", me, dtype_name(dtype), i, got, want);
    }
    return "";
}

inline std::string check_op(Communicator& c, const std::string& op, size_t size, Buffers buffers = Buffers::Plain) {
    if (op == "p2p") return check_p2p(c, size, buffers);
    if (op == "all_to_all_v") return check_all_to_all_v(c, size, buffers);
    if (op == "all_gather") return check_all_gather(c, size, buffers);
    if (op == "reduce_scatter") {
        std::string e = check_reduce_scatter(c, size, DType::F32, buffers);
        return e.empty() ? check_reduce_scatter(c, size, DType::BF16, buffers) : e;
    }
    if (op == "all_reduce") {
        std::string e = check_all_reduce(c, size, DType::F32, buffers);
        return e.empty() ? check_all_reduce(c, size, DType::BF16, buffers) : e;
    }
    return "unknown op " + op;
}

// A barrier holds every rank until the last one arrives: rank r arrives 15 ms x r late, and no rank may leave
// before the latest arrival (now_seconds is one steady clock per machine, for threads and processes alike). A
// barrier that returns at once fails here by 15 ms x (size - 1 - rank).
inline std::string check_barrier(Communicator& c) {
    int n = c.size(), me = c.rank();
    for (int round = 0; round < 2; ++round) {
        int late = round == 0 ? me : n - 1 - me;  // the last to arrive: the highest rank, then the lowest
        std::this_thread::sleep_for(std::chrono::milliseconds(15 * late));
        double arrived = now_seconds();
        c.barrier()->wait();
        double left = now_seconds();
        std::vector<double> all(size_t(n), 0.0);
        c.all_gather(&arrived, all.data(), sizeof(double))->wait();
        for (int r = 0; r < n; ++r)
            if (left < all[size_t(r)])
                return fmt::format("rank {}: left the barrier {:.2f} ms before rank {} arrived", me,
                                   (all[size_t(r)] - left) * 1e3, r);
    }
    return "";
}

// Splits by parity with reversed keys, reduces inside each group, then splits a group again.
inline std::string check_split(Communicator& c) {
    int n = c.size(), me = c.rank();
    auto sub = c.split(me % 2, -me);
    int members = (n + 1 - me % 2) / 2;
    if (!sub || sub->size() != members) return fmt::format("rank {}: split group size wrong", me);
    // Reversed keys: the highest world rank of the group is its rank 0.
    int expected_rank = (members - 1) - me / 2;
    if (sub->rank() != expected_rank)
        return fmt::format("rank {}: split rank {} != {}", me, sub->rank(), expected_rank);
    int64_t v = me;
    sub->all_reduce(&v, 1, DType::I64)->wait();
    int64_t want = 0;
    for (int r = me % 2; r < n; r += 2) want += r;
    if (v != want) return fmt::format("rank {}: sum over split group {} != {}", me, v, want);
    // Operations on parent and child interleave without confusion.
    auto w1 = c.barrier();
    auto inner = sub->split(sub->rank() == 0 ? -1 : 0, 0);
    w1->wait();
    if (sub->rank() == 0 && inner) return "negative color must give no group";
    if (sub->rank() != 0 && (!inner || inner->size() != members - 1)) return "nested split size wrong";
    std::string e = check_all_to_all_v(*sub, 33);
    return e;
}

// Many operations posted at once and completed out of order.
inline std::string check_many_in_flight(Communicator& c) {
    int n = c.size(), me = c.rank(), to = (me + 1) % n, from = (me - 1 + n) % n;
    constexpr int kMessages = 24;
    std::vector<std::vector<uint8_t>> in(kMessages), out(kMessages);
    std::vector<WorkPtr> recvs, sends;
    for (int t = 0; t < kMessages; ++t) {
        in[t].assign(100 + t * 37, 0);
        recvs.push_back(c.irecv(in[t].data(), in[t].size(), from, uint32_t(t)));
    }
    std::vector<int64_t> red(1000, me);
    WorkPtr coll = c.all_reduce(red.data(), red.size(), DType::I64);
    for (int t = kMessages - 1; t >= 0; --t) {
        out[t].resize(100 + t * 37);
        for (size_t i = 0; i < out[t].size(); ++i) out[t][i] = pattern(me, t, i);
        sends.push_back(c.isend(out[t].data(), out[t].size(), to, uint32_t(t)));
    }
    for (int t = 0; t < kMessages; t += 2) recvs[t]->wait();  // even tags first
    for (int t = 1; t < kMessages; t += 2) recvs[t]->wait();
    wait_all(sends);
    coll->wait();
    for (int t = 0; t < kMessages; ++t)
        for (size_t i = 0; i < in[t].size(); ++i)
            if (in[t][i] != pattern(from, t, i)) return fmt::format("rank {}: message tag {} byte {} wrong", me, t, i);
    int64_t want = int64_t(n) * (n - 1) / 2;
    for (int64_t v : red)
        if (v != want) return fmt::format("rank {}: all_reduce in flight gave {} != {}", me, v, want);
    return "";
}

// Work nobody waits on still completes: ranks 0 and 1 exchange a small and a large message (the large one a single
// copy on UCX: the receiver's progress thread must read it) and every rank starts an all_reduce, all polled with
// test() only, so the backend's progress thread and the communicator's worker must move them. Twice: the second
// time after 150 ms of quiet, past ProgressGate::kDeepAfter, so a thread asleep until a post must be woken by one.
inline std::string check_progress_without_waiting(Communicator& c) {
    int me = c.rank();
    auto settle = [](const WorkPtr& w) {
        Deadline d(30);
        while (!w->test() && !d.expired()) std::this_thread::yield();
        return w->test();
    };
    for (int round = 0; round < 2; ++round) {
        if (round == 1) std::this_thread::sleep_for(std::chrono::milliseconds(150));
        std::vector<uint8_t> small(64, uint8_t(round + 1)), large(size_t(1) << 20, uint8_t(round + 7));
        std::vector<uint8_t> small_in(small.size(), 0), large_in(large.size(), 0);
        std::vector<WorkPtr> mine;  // what this rank polls
        bool pair = c.size() >= 2;
        if (me == 0 && pair) {
            mine.push_back(c.irecv(small_in.data(), small_in.size(), 1, 40));
            mine.push_back(c.irecv(large_in.data(), large_in.size(), 1, 41));
        } else if (me == 1) {
            c.isend(small.data(), small.size(), 0, 40)->wait();
            c.isend(large.data(), large.size(), 0, 41)->wait();
        }
        std::vector<int64_t> red(16, me + round);
        WorkPtr coll = c.all_reduce(red.data(), red.size(), DType::I64);
        for (size_t k = 0; k < mine.size(); ++k)
            if (!settle(mine[k]))
                return fmt::format("rank {}: round {}: receive {} did not complete within 30 s without wait()", me, round,
                                   k);
        if (!settle(coll))
            return fmt::format("rank {}: round {}: all_reduce did not complete within 30 s without wait()", me, round);
        if (me == 0 && pair && (small_in != small || large_in != large))
            return fmt::format("rank 0: round {}: the bytes received differ from the bytes sent", round);
        int64_t want = int64_t(c.size()) * (c.size() - 1) / 2 + int64_t(c.size()) * round;
        if (red[0] != want) return fmt::format("rank {}: round {}: all_reduce gave {} != {}", me, round, red[0], want);
    }
    return "";
}

}  // namespace duplex::testing
