// Every CUDA kernel against its CPU reference (ctest label `gpu`): FP8 bit for bit, permute/combine bit for bit,
// the exchange equal to a plain copy under several SM budgets, dispatch equal to a plain gather and combine to
// kernels::combine_node_limited(_bf16) bit for bit (fp32, BF16, FP8 rows; one node and several; relays bounded),
// the expert GEMM within BF16 tolerance. Tests that
// need a device skip without one; the argument checks run everywhere.
#include "kernels/cuda/kernels.hpp"

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>

#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/cpu/permute.hpp"
#include "tests/kernels/random_masks.hpp"
#include "kernels/cuda/device.hpp"

namespace duplex::cuda {
namespace {

bool have_gpu() { return !cuda_devices().empty(); }

#define NEED_GPU() \
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device"

// A device copy of a host vector, copied back on demand.
template <typename T>
class Dev {
public:
    explicit Dev(size_t n) : n_(n) {
        if (n_ && cudaMalloc(&p_, n_ * sizeof(T)) != cudaSuccess) throw Error("cudaMalloc failed");
    }
    explicit Dev(const std::vector<T>& v) : Dev(v.size()) {
        if (n_) cudaMemcpy(p_, v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice);
    }
    ~Dev() {
        if (p_) cudaFree(p_);
    }
    T* get() { return p_; }
    size_t size() const { return n_; }
    std::vector<T> host() const {
        std::vector<T> v(n_);
        if (n_) cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
        return v;
    }

private:
    T* p_ = nullptr;
    size_t n_;
};

std::vector<float> random_floats(size_t n, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> v(n);
    for (float& x : v) x = float(rng.normal() * std::pow(2.0, double(rng.below(12)) - 6));
    return v;
}

TEST(CudaFp8, ActivationTilesMatchTheCpuBitForBit) {
    NEED_GPU();
    const int rows = 67, cols = 512;
    auto x = random_floats(size_t(rows) * cols, 5);
    std::vector<uint8_t> q(x.size());
    std::vector<float> s(size_t(rows) * cols / 128), back(x.size());
    kernels::quantize_fp8_1x128(x.data(), rows, cols, q.data(), s.data());
    kernels::dequantize_fp8_1x128(q.data(), s.data(), rows, cols, back.data());
    Dev<float> dx(x), ds(s.size()), dback(x.size());
    Dev<uint8_t> dq(q.size());
    quantize_fp8_1x128(dx.get(), rows, cols, dq.get(), ds.get(), nullptr);
    dequantize_fp8_1x128(dq.get(), ds.get(), rows, cols, dback.get(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(dq.host(), q);
    EXPECT_EQ(ds.host(), s);
    EXPECT_EQ(dback.host(), back);
}

TEST(CudaFp8, WeightBlocksMatchTheCpuBitForBit) {
    NEED_GPU();
    const int rows = 256, cols = 384;
    auto w = random_floats(size_t(rows) * cols, 6);
    std::vector<uint8_t> q(w.size());
    std::vector<float> s(size_t(rows / 128) * (cols / 128)), back(w.size());
    kernels::quantize_fp8_128x128(w.data(), rows, cols, q.data(), s.data());
    kernels::dequantize_fp8_128x128(q.data(), s.data(), rows, cols, back.data());
    Dev<float> dw(w), ds(s.size()), dback(w.size());
    Dev<uint8_t> dq(q.size());
    quantize_fp8_128x128(dw.get(), rows, cols, dq.get(), ds.get(), nullptr);
    dequantize_fp8_128x128(dq.get(), ds.get(), rows, cols, dback.get(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(dq.host(), q);
    EXPECT_EQ(ds.host(), s);
    EXPECT_EQ(dback.host(), back);
}

TEST(CudaFp8, RejectsWidthsThatAreNotTiles) {
    // Checked on the host before any launch: no device needed.
    EXPECT_THROW(quantize_fp8_1x128(nullptr, 4, 100, nullptr, nullptr, nullptr), ConfigError);
    EXPECT_THROW(quantize_fp8_128x128(nullptr, 100, 128, nullptr, nullptr, nullptr), ConfigError);
}

TEST(CudaPermute, PermuteAndCombineMatchTheCpuBitForBit) {
    NEED_GPU();
    const int tokens = 300, top_k = 8, dim = 136, peers = 16;
    Rng rng(9);
    auto x = random_floats(size_t(tokens) * dim, 7);
    std::vector<float> gates(size_t(tokens) * top_k);
    for (float& g : gates) g = float(rng.uniform());
    std::vector<int> dest(gates.size()), src(gates.size());
    for (size_t i = 0; i < dest.size(); ++i) dest[i] = int(rng.below(peers)), src[i] = int(i / top_k);
    kernels::DispatchLayout l = kernels::dispatch_layout(dest, peers);
    std::vector<float> send(size_t(l.num_rows()) * dim), y(x.size());
    kernels::permute_rows(x.data(), dim, src, l, send.data());
    kernels::combine_rows(send.data(), dim, l, gates.data(), tokens, top_k, y.data());
    DeviceLayout dl(l);
    Dev<float> dx(x), dsend(send.size()), dgates(gates), dy(y.size());
    Dev<int> dsrc(src);
    permute_rows(dx.get(), dim, dsrc.get(), dl, dsend.get(), nullptr);
    combine_rows(dsend.get(), dim, dl, dgates.get(), tokens, top_k, dy.get(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(dsend.host(), send);
    EXPECT_EQ(dy.host(), y);
    // Combine backward: gate the permuted rows, dot each slot's output with its token's gradient.
    auto outputs = random_floats(send.size(), 8);
    std::vector<float> dots(gates.size()), gated = send;
    kernels::gate_rows(gated.data(), dim, l, gates.data());
    kernels::slot_dots(x.data(), outputs.data(), dim, l, tokens, top_k, dots.data());
    Dev<float> dout(outputs), ddots(dots.size());
    gate_rows(dsend.get(), dim, dl, dgates.get(), nullptr);
    slot_dots(dx.get(), dout.get(), dim, dl, tokens, top_k, ddots.get(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(dsend.host(), gated);
    EXPECT_EQ(ddots.host(), dots);
}

struct ExchangeCase {
    std::vector<std::vector<int64_t>> counts, offsets;
    std::vector<int64_t> send_rows, recv_rows;
};

ExchangeCase random_exchange(int ranks, uint64_t seed) {
    Rng rng(seed);
    ExchangeCase c;
    c.counts.assign(ranks, std::vector<int64_t>(ranks));
    c.offsets.assign(ranks, std::vector<int64_t>(ranks));
    c.send_rows.assign(ranks, 0);
    c.recv_rows.assign(ranks, 0);
    for (int s = 0; s < ranks; ++s)
        for (int d = 0; d < ranks; ++d) {
            c.counts[s][d] = int64_t(rng.below(200));  // zero included
            c.offsets[s][d] = c.send_rows[s];
            c.send_rows[s] += c.counts[s][d];
            c.recv_rows[d] += c.counts[s][d];
        }
    return c;
}

// dim 96: rows 16-byte aligned, the 128-bit copy; dim 7: rows misaligned, the one-float copy and its tails.
class CudaExchangeWidth : public ::testing::TestWithParam<int> {};
INSTANTIATE_TEST_SUITE_P(Widths, CudaExchangeWidth, ::testing::Values(96, 7));

TEST_P(CudaExchangeWidth, EqualsAPlainCopyUnderEverySmBudget) {
    NEED_GPU();
    const int ranks = 8, dim = GetParam();
    ExchangeCase c = random_exchange(ranks, 21);
    std::vector<std::vector<float>> host_send(ranks);
    std::vector<std::unique_ptr<Dev<float>>> send, recv;
    std::vector<const float*> send_ptr;
    std::vector<float*> recv_ptr;
    for (int r = 0; r < ranks; ++r) {
        host_send[r] = random_floats(size_t(c.send_rows[r]) * dim, 100 + r);
        send.push_back(std::make_unique<Dev<float>>(host_send[r]));
        recv.push_back(std::make_unique<Dev<float>>(size_t(c.recv_rows[r]) * dim));
        send_ptr.push_back(send.back()->get());
        recv_ptr.push_back(recv.back()->get());
    }
    // The reference: destination d gets source 0's rows for d, then source 1's, ...
    std::vector<std::vector<float>> want(ranks);
    for (int d = 0; d < ranks; ++d)
        for (int s = 0; s < ranks; ++s)
            want[d].insert(want[d].end(), host_send[s].begin() + c.offsets[s][d] * dim,
                           host_send[s].begin() + (c.offsets[s][d] + c.counts[s][d]) * dim);
    for (int sms : {1, 4, 20, 32}) {
        ExchangeConfig cfg;
        cfg.num_sms = std::min(sms, cuda_devices()[0].num_sms);
        for (auto& b : recv) cudaMemset(b->get(), 0xFF, b->size() * sizeof(float));  // stale results must not pass
        exchange_rows(send_ptr, c.offsets, c.counts, recv_ptr, c.recv_rows, dim, cfg, nullptr);
        for (int d = 0; d < ranks; ++d) ASSERT_EQ(recv[d]->host(), want[d]) << "rank " << d << ", " << sms << " SMs";
    }
}

TEST(CudaExchange, RejectsBadBudgetsAndBuffersBeforeLaunch) {
    // Host-side checks: no device needed (132 SMs stands for an H800/H100).
    ExchangeCase c = random_exchange(4, 3);
    ExchangeConfig cfg;
    EXPECT_NO_THROW(check_exchange(4, c.counts, c.recv_rows, 64, cfg, 132));
    cfg.num_sms = 133;
    EXPECT_THROW(check_exchange(4, c.counts, c.recv_rows, 64, cfg, 132), ConfigError);
    cfg.num_sms = 0;
    EXPECT_THROW(check_exchange(4, c.counts, c.recv_rows, 64, cfg, 132), ConfigError);
    cfg.num_sms = 20;
    auto small = c.recv_rows;
    small[2] -= 1;
    EXPECT_THROW(check_exchange(4, c.counts, small, 64, cfg, 132), ConfigError);
    cfg.relay_rows = -1;
    EXPECT_THROW(check_exchange(4, c.counts, c.recv_rows, 64, cfg, 132), ConfigError);
}

TEST(CudaExchange, SegmentsPutEveryRowWhereTheLayoutSays) {
    NEED_GPU();
    // Each destination takes its rows block by block in a shuffled order (as the device MoE layer's expert-major
    // layout does): segment k of the list lands after the ones placed before it.
    const int ranks = 4, dim = 40;
    Rng rng(8);
    std::vector<std::vector<float>> host_send(ranks), want(ranks);
    std::vector<std::unique_ptr<Dev<float>>> send, recv;
    std::vector<const float*> sp;
    std::vector<float*> rp;
    std::vector<RowSegment> segments;
    std::vector<int64_t> filled(ranks, 0);
    for (int s = 0; s < ranks; ++s) host_send[s] = random_floats(size_t(60) * dim, 30 + s);
    for (int k = 0; k < 40; ++k) {
        RowSegment g;
        g.src = int(rng.below(ranks)), g.dst = int(rng.below(ranks));
        g.rows = int64_t(rng.below(9));  // empty ones too
        g.src_row = int64_t(rng.below(uint64_t(60 - g.rows + 1)));
        g.dst_row = filled[g.dst];
        filled[g.dst] += g.rows;
        want[g.dst].insert(want[g.dst].end(), host_send[g.src].begin() + g.src_row * dim,
                           host_send[g.src].begin() + (g.src_row + g.rows) * dim);
        segments.push_back(g);
    }
    for (int r = 0; r < ranks; ++r) {
        send.push_back(std::make_unique<Dev<float>>(host_send[r]));
        recv.push_back(std::make_unique<Dev<float>>(want[r].size()));
        sp.push_back(send.back()->get());
        rp.push_back(recv.back()->get());
    }
    ExchangeConfig cfg;
    cfg.num_sms = std::min(3, cuda_devices()[0].num_sms);
    for (auto& b : recv) cudaMemset(b->get(), 0xFF, b->size() * sizeof(float));
    exchange_segments(sp, rp, segments, filled, dim, cfg, nullptr);
    for (int d = 0; d < ranks; ++d) ASSERT_EQ(recv[d]->host(), want[d]) << "rank " << d;
}

TEST(CudaExchange, SegmentsOutOfRangeOrPastTheirBufferAreRefusedBeforeLaunch) {
    // Checked before the device is asked anything: no GPU needed.
    std::vector<const float*> send(2, nullptr);
    std::vector<float*> recv(2, nullptr);
    std::vector<int64_t> cap = {10, 4};
    ExchangeConfig cfg;
    auto refused = [&](RowSegment g) {
        EXPECT_THROW(exchange_segments(send, recv, {g}, cap, 8, cfg, nullptr), ConfigError)
            << g.src << " " << g.dst << " " << g.src_row << " " << g.dst_row << " " << g.rows;
    };
    refused({0, 2, 0, 0, 1});   // no rank 2
    refused({-1, 0, 0, 0, 1});  // no rank -1
    refused({0, 1, 0, 0, -1});  // negative rows
    refused({0, 1, -3, 0, 1});  // negative offset
    refused({0, 1, 0, 2, 3});   // rows 2..4 of a 4-row buffer
    EXPECT_THROW(exchange_segments(send, recv, {}, {10}, 8, cfg, nullptr), ConfigError);  // capacities for 1 of 2
}

using test_support::random_masks;

// Rows of a type as bytes, plane by plane: fp32 and BF16 from random floats, FP8 through the CPU quantizer.
std::vector<std::vector<uint8_t>> typed_rows(RowType type, size_t rows, int dim, uint64_t seed) {
    std::vector<float> x = random_floats(rows * dim, seed);
    auto bytes = [](const void* p, size_t n) {
        const auto* b = static_cast<const uint8_t*>(p);
        return std::vector<uint8_t>(b, b + n);
    };
    if (type == RowType::F32) return {bytes(x.data(), x.size() * 4)};
    if (type == RowType::BF16) {
        std::vector<uint16_t> h;
        for (float v : x) h.push_back(fp32_to_bf16(v));
        return {bytes(h.data(), h.size() * 2)};
    }
    std::vector<uint8_t> q(x.size());
    std::vector<float> scales(rows * dim / 128);
    if (rows) kernels::quantize_fp8_1x128(x.data(), int(rows), dim, q.data(), scales.data());
    return {q, bytes(scales.data(), scales.size() * 4)};
}

struct NodeLimitedCase {
    RowType type;
    int dim, nodes;
};
void PrintTo(const NodeLimitedCase& c, std::ostream* os) {
    *os << row_type_name(c.type) << " rows of " << c.dim << ", " << c.nodes << " node(s)";
}

// dim 160 f32 / 136 bf16 / 256 fp8: 16-byte rows; 7 f32, 9 bf16: misaligned rows, the 4-byte and 1-byte copies.
class CudaDispatch : public ::testing::TestWithParam<NodeLimitedCase> {};
INSTANTIATE_TEST_SUITE_P(Rows, CudaDispatch,
                         ::testing::Values(NodeLimitedCase{RowType::F32, 160, 2}, NodeLimitedCase{RowType::F32, 7, 1},
                                           NodeLimitedCase{RowType::BF16, 136, 1}, NodeLimitedCase{RowType::BF16, 9, 4},
                                           NodeLimitedCase{RowType::FP8, 256, 2}, NodeLimitedCase{RowType::FP8, 128, 1}));

TEST_P(CudaDispatch, DeliversWhatAPlainGatherDoesCrossingEachNodeOnce) {
    NEED_GPU();
    const auto [type, dim, nodes] = GetParam();
    const int ranks = 8, L = ranks / nodes;
    auto masks = random_masks(ranks, nodes, 300, 8, std::min(2, nodes), 5);
    const std::vector<size_t> bytes = row_plane_bytes(type, dim);
    const size_t P = bytes.size();
    std::vector<std::vector<std::vector<uint8_t>>> host_x(ranks), want(ranks, std::vector<std::vector<uint8_t>>(P));
    for (int s = 0; s < ranks; ++s) host_x[s] = typed_rows(type, masks[s].size(), dim, 40 + s);
    // The reference: rank d gets rank 0's tokens for d (ascending), then rank 1's, ...
    for (int d = 0; d < ranks; ++d)
        for (int s = 0; s < ranks; ++s)
            for (size_t t = 0; t < masks[s].size(); ++t)
                if ((masks[s][t] >> d) & 1)
                    for (size_t p = 0; p < P; ++p)
                        want[d][p].insert(want[d][p].end(), host_x[s][p].begin() + t * bytes[p],
                                          host_x[s][p].begin() + (t + 1) * bytes[p]);
    std::vector<std::unique_ptr<Dev<uint8_t>>> keep;
    SourcePlanes xp(P);
    TargetPlanes rp(P);
    std::vector<std::vector<Dev<uint8_t>*>> recv(ranks);
    std::vector<int64_t> cap(ranks);
    for (int r = 0; r < ranks; ++r) {
        cap[r] = int64_t(want[r][0].size() / bytes[0]);
        for (size_t p = 0; p < P; ++p) {
            keep.push_back(std::make_unique<Dev<uint8_t>>(host_x[r][p]));
            xp[p].push_back(keep.back()->get());
            keep.push_back(std::make_unique<Dev<uint8_t>>(want[r][p].size()));
            rp[p].push_back(keep.back()->get());
            recv[r].push_back(keep.back().get());
        }
    }
    int64_t inter = 0, flat = 0;  // rows crossing nodes: one per (token, other node) vs one per (token, rank)
    for (int s = 0; s < ranks; ++s)
        for (uint64_t mk : masks[s])
            for (int m = 0; m < nodes; ++m) {
                uint64_t here = (mk >> (m * L)) & ((1ull << L) - 1);
                if (here && m != s / L) ++inter, flat += __builtin_popcountll(here);
            }
    for (int sms : {1, 3, 20})
        for (int64_t relay : {int64_t(0), int64_t(nodes)}) {  // all at once; a token per round
            ExchangeConfig cfg;
            cfg.num_sms = std::min(sms, cuda_devices()[0].num_sms);
            cfg.relay_rows = relay;
            for (auto& planes : recv)
                for (auto* b : planes) cudaMemset(b->get(), 0xFF, b->size());  // stale results must not pass
            NodeLimitedResult r = dispatch_rows_node_limited(type, dim, xp, masks, nodes, rp, cap, cfg, nullptr);
            for (int d = 0; d < ranks; ++d)
                for (size_t p = 0; p < P; ++p)
                    ASSERT_EQ(recv[d][p]->host(), want[d][p]) << "rank " << d << ", plane " << p << ", " << sms
                                                             << " SMs, relay rows " << relay;
            EXPECT_EQ(r.inter_node_rows, inter);
            EXPECT_EQ(r.flat_inter_node_rows, flat);
        }
}

class CudaCombine : public ::testing::TestWithParam<NodeLimitedCase> {};
INSTANTIATE_TEST_SUITE_P(Rows, CudaCombine,
                         ::testing::Values(NodeLimitedCase{RowType::F32, 136, 2}, NodeLimitedCase{RowType::F32, 7, 1},
                                           NodeLimitedCase{RowType::BF16, 136, 2}, NodeLimitedCase{RowType::BF16, 9, 1},
                                           NodeLimitedCase{RowType::BF16, 64, 4}));

TEST_P(CudaCombine, SumsInsideEachNodeBitForBitLikeTheCpu) {
    NEED_GPU();
    const auto [type, dim, nodes] = GetParam();
    const int ranks = 8;
    const size_t esize = type == RowType::F32 ? 4 : 2;
    auto masks = random_masks(ranks, nodes, 250, 8, std::min(2, nodes), 17);
    std::vector<int64_t> rows(ranks, 0);  // per rank: one per (token, rank) that went there
    for (int s = 0; s < ranks; ++s)
        for (uint64_t mk : masks[s])
            for (int d = 0; d < ranks; ++d) rows[d] += (mk >> d) & 1;
    std::vector<std::vector<uint8_t>> host_in(ranks), want(ranks), want_unweighted(ranks);
    std::vector<std::vector<float>> host_w(ranks);
    std::vector<std::unique_ptr<Dev<uint8_t>>> in, y;
    std::vector<std::unique_ptr<Dev<float>>> w;
    std::vector<const void*> inp;
    std::vector<void*> yp;
    std::vector<const float*> wp, w_h;
    for (int r = 0; r < ranks; ++r) {
        host_in[r] = typed_rows(type, size_t(rows[r]), dim, 70 + r)[0];
        host_w[r] = random_floats(size_t(rows[r]), 90 + r);
        want[r].resize(masks[r].size() * dim * esize);
        want_unweighted[r].resize(want[r].size());
        in.push_back(std::make_unique<Dev<uint8_t>>(host_in[r]));
        w.push_back(std::make_unique<Dev<float>>(host_w[r]));
        y.push_back(std::make_unique<Dev<uint8_t>>(want[r].size()));
        inp.push_back(in.back()->get());
        wp.push_back(w.back()->get());
        yp.push_back(y.back()->get());
        w_h.push_back(host_w[r].data());
    }
    for (bool weighted : {true, false}) {
        auto& out = weighted ? want : want_unweighted;
        std::vector<const void*> in_h;
        std::vector<void*> y_h;
        for (int r = 0; r < ranks; ++r) in_h.push_back(host_in[r].data()), y_h.push_back(out[r].data());
        kernels::combine_node_limited_rows(type == RowType::BF16, in_h, weighted ? w_h : std::vector<const float*>{},
                                           masks, nodes, dim, y_h);
    }
    for (int sms : {1, 3, 20})
        for (int64_t relay : {int64_t(0), int64_t(nodes)})
            for (bool weighted : {true, false}) {
                ExchangeConfig cfg;
                cfg.num_sms = std::min(sms, cuda_devices()[0].num_sms);
                cfg.relay_rows = relay;
                for (auto& b : y) cudaMemset(b->get(), 0xFF, b->size());
                NodeLimitedResult r = combine_rows_node_limited(type, dim, inp, weighted ? wp : std::vector<const float*>{},
                                                                 masks, nodes, rows, yp, cfg, nullptr);
                for (int s = 0; s < ranks; ++s)
                    ASSERT_EQ(y[s]->host(), weighted ? want[s] : want_unweighted[s])
                        << "rank " << s << ", " << sms << " SMs, relay rows " << relay << ", weighted " << weighted;
                if (nodes > 1) {
                    EXPECT_LT(r.inter_node_rows, r.flat_inter_node_rows);
                }
            }
    auto small = rows;
    small[3] -= 1;
    EXPECT_THROW(combine_rows_node_limited(type, dim, inp, wp, masks, nodes, small, yp, ExchangeConfig{}, nullptr),
                 ConfigError);
    EXPECT_THROW(combine_rows_node_limited(type, dim, inp, {wp[0]}, masks, nodes, rows, yp, ExchangeConfig{}, nullptr),
                 ConfigError);
    EXPECT_THROW(combine_rows_node_limited(RowType::FP8, 128, inp, wp, masks, nodes, rows, yp, ExchangeConfig{}, nullptr),
                 ConfigError);
}

TEST(CudaNodeLimited, RejectsBadTopologiesWidthsAndBuffersBeforeLaunch) {
    // Host-side checks: no device needed (132 SMs stands for an H800/H100).
    auto masks = random_masks(8, 2, 50, 4, 2, 9);
    std::vector<int64_t> cap(8, 1 << 20);
    ExchangeConfig cfg;
    auto rows = check_node_limited(RowType::BF16, 128, masks, 2, cap, 1, cfg, 132);
    int64_t total = 0;
    for (int64_t r : rows) total += r;
    EXPECT_GT(total, 0);
    EXPECT_THROW(check_node_limited(RowType::BF16, 128, masks, 3, cap, 1, cfg, 132), ConfigError);  // 8 ranks, 3 nodes
    auto small = rows;
    small[5] -= 1;
    EXPECT_THROW(check_node_limited(RowType::BF16, 128, masks, 2, small, 1, cfg, 132), ConfigError);
    auto beyond = masks;
    beyond[0][0] |= 1ull << 9;  // rank 9 of 8
    EXPECT_THROW(check_node_limited(RowType::BF16, 128, beyond, 2, cap, 1, cfg, 132), ConfigError);
    EXPECT_NO_THROW(check_node_limited(RowType::FP8, 256, masks, 2, cap, 2, cfg, 132));
    EXPECT_THROW(check_node_limited(RowType::FP8, 200, masks, 2, cap, 2, cfg, 132), ConfigError);  // not 128 k
    EXPECT_THROW(check_node_limited(RowType::FP8, 256, masks, 2, cap, 1, cfg, 132), ConfigError);  // scales missing
    EXPECT_THROW(check_node_limited(RowType::F32, 0, masks, 2, cap, 1, cfg, 132), ConfigError);
    cfg.relay_rows = 1;  // a token can need a relay row on both nodes
    EXPECT_THROW(check_node_limited(RowType::F32, 64, masks, 2, cap, 1, cfg, 132), ConfigError);
    cfg.relay_rows = 0;
    cfg.num_sms = 200;
    EXPECT_THROW(check_node_limited(RowType::F32, 64, masks, 2, cap, 1, cfg, 132), ConfigError);
    EXPECT_EQ(parse_row_type("fp8", "--dtype"), RowType::FP8);
    EXPECT_THROW(parse_row_type("fp16", "--dtype"), ConfigError);
}

TEST(CudaGemm, ExpertGemmsMatchTheCpuWithinBf16Tolerance) {
    NEED_GPU();
    const int k = 256, n = 192;
    std::vector<int> rows = {0, 17, 64, 130};
    Rng rng(4);
    std::vector<std::vector<uint16_t>> a(rows.size()), b(rows.size());
    std::vector<std::unique_ptr<Dev<uint16_t>>> da, db;
    std::vector<std::unique_ptr<Dev<float>>> dc;
    std::vector<const uint16_t*> pa, pb;
    std::vector<float*> pc;
    for (size_t e = 0; e < rows.size(); ++e) {
        a[e].resize(size_t(rows[e]) * k);
        b[e].resize(size_t(k) * n);
        for (auto& v : a[e]) v = fp32_to_bf16(float(rng.normal()));
        for (auto& v : b[e]) v = fp32_to_bf16(float(rng.normal() * 0.1));
        da.push_back(std::make_unique<Dev<uint16_t>>(a[e]));
        db.push_back(std::make_unique<Dev<uint16_t>>(b[e]));
        dc.push_back(std::make_unique<Dev<float>>(size_t(rows[e]) * n));
        pa.push_back(da.back()->get());
        pb.push_back(db.back()->get());
        pc.push_back(dc.back()->get());
    }
    GemmPath path = expert_gemm_bf16(pa, pb, pc, rows, k, n, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    RecordProperty("cublas_path", path == GemmPath::Grouped ? "grouped" : "per-expert");
    for (size_t e = 0; e < rows.size(); ++e) {
        std::vector<float> got = dc[e]->host();
        for (int i = 0; i < rows[e]; ++i)
            for (int j = 0; j < n; ++j) {
                double want = 0, mag = 0;
                for (int t = 0; t < k; ++t) {
                    double p = double(bf16_to_fp32(a[e][size_t(i) * k + t])) * bf16_to_fp32(b[e][size_t(t) * n + j]);
                    want += p;
                    mag += std::fabs(p);
                }
                // fp32 accumulation of exact BF16 products: k = 256 roundings of 2^-24 at most.
                ASSERT_NEAR(got[size_t(i) * n + j], want, 1e-4 * mag + 1e-6) << "expert " << e;
            }
    }
}

}  // namespace
}  // namespace duplex::cuda
