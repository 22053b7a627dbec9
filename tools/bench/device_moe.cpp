#include "tools/bench/device_moe.hpp"

#include "parallel/expert_plan.hpp"
#include "parallel/plan.hpp"

#include <cuda_runtime.h>

#include <chrono>

#include <fmt/format.h>

#include "core/cuda_check.hpp"
#include "core/error.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cuda/buffer.hpp"
#include "kernels/cuda/device.hpp"

namespace duplex {

using cuda::DeviceArray;

namespace {

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The expert MLP's math in fp32 or on BF16 values (bit patterns), one name each: C = op(A) op(B) + beta C
// (row-major), SwiGLU and its backward.
void mlp_gemm(bool ta, bool tb, int m, int n, int k, float beta, const float* a, const float* b, float* c,
              cudaStream_t stream) {
    cuda::gemm_f32(ta, tb, m, n, k, 1, a, b, beta, c, stream);
}
void mlp_gemm(bool ta, bool tb, int m, int n, int k, float beta, const uint16_t* a, const uint16_t* b, uint16_t* c,
              cudaStream_t stream) {
    cuda::gemm_bf16(ta, tb, m, n, k, 1, a, b, beta, c, true, stream);
}
void mlp_gemm(bool ta, bool tb, int m, int n, int k, float beta, const uint16_t* a, const uint16_t* b, float* c,
              cudaStream_t stream) {
    cuda::gemm_bf16(ta, tb, m, n, k, 1, a, b, beta, c, false, stream);
}
void mlp_swiglu(const DeviceArray<float>& a, const DeviceArray<float>& b, size_t n, DeviceArray<float>& h,
                cudaStream_t stream) {
    cuda::swiglu_forward(a.get(), b.get(), n, h.get(), stream);
}
void mlp_swiglu(const DeviceArray<uint16_t>& a, const DeviceArray<uint16_t>& b, size_t n, DeviceArray<uint16_t>& h,
                cudaStream_t stream) {
    cuda::swiglu_forward_bf16(a.get(), b.get(), n, h.get(), stream);
}
void mlp_swiglu_backward(const DeviceArray<float>& dh, const DeviceArray<float>& a, const DeviceArray<float>& b,
                         size_t n, DeviceArray<float>& da, DeviceArray<float>& db, cudaStream_t stream) {
    cuda::swiglu_backward(dh.get(), a.get(), b.get(), n, da.get(), db.get(), stream);
}
void mlp_swiglu_backward(const DeviceArray<uint16_t>& dh, const DeviceArray<uint16_t>& a,
                         const DeviceArray<uint16_t>& b, size_t n, DeviceArray<uint16_t>& da, DeviceArray<uint16_t>& db,
                         cudaStream_t stream) {
    cuda::swiglu_backward_bf16(dh.get(), a.get(), b.get(), n, da.get(), db.get(), stream);
}

}  // namespace

struct DeviceMoeLayer::Impl {
    DeviceMoeOptions o;
    int V = 0, per = 0, d = 0, f = 0, K = 0;
    DeviceArray<float> w1, w3, w2, g1, g3, g2;  // [experts][d x f], [experts][d x f], [experts][f x d]
    DeviceArray<uint16_t> w1h, w3h, w2h;        // BF16 copies of the weights (bf16 mode)
    cudaStream_t comm = nullptr, compute = nullptr;

    // One rank's part of one microbatch: as a token owner (slots) and as an expert owner (rows it serves).
    struct Rank {
        int tokens = 0;
        kernels::DispatchLayout layout;  // items = slots, grouped by expert (so by destination rank too)
        std::unique_ptr<cuda::DeviceLayout> dl;
        DeviceArray<int> src_row;        // slot -> token
        DeviceArray<float> gates, ones, x, send, back, dgate, y;
        // As an expert owner: its rows expert-major (each local expert's rows together, sources in order inside),
        // so each expert's MLP is one GEMM per weight.
        int64_t rows_in = 0;
        std::vector<int64_t> expert_off;               // per local expert + 1: its first row
        std::vector<std::vector<int64_t>> block_off;   // [source][local expert]: the first row of that block
        DeviceArray<float> recv, a1, a3, out;
        DeviceArray<float> s, ds, da1, da3, dxr;
        // FP8 dispatch: quantized tokens and their scales, packed one row per token / slot / arrived row.
        DeviceArray<uint8_t> q;
        DeviceArray<float> scales, x8, send8, recv8;  // expert MLP temporaries (allocated up front: a cudaFree in
                                                  // the pipelined section would synchronize the whole device)
        // bf16 mode: the slot rows as they cross (token side), and the experts' rows and activations.
        DeviceArray<uint16_t> send16, back16;
        DeviceArray<uint16_t> recv16, a1h, a3h, sh, outh, dsh, da1h, da3h, dxrh;
    };
    struct Micro {
        std::vector<Rank> ranks;
        cudaEvent_t dispatched = nullptr, computed = nullptr;
    };
    std::vector<Micro> mbs;

    // An FP8 row in floats: hidden e4m3 bytes, then hidden / 128 fp32 scales.
    int packed_width() const { return d / 4 + d / 128; }
    // q [rows, d] bytes and scales [rows, d / 128] <-> packed rows, as strided copies on `stream`.
    void pack(const Rank& R, int rows, float* packed, cudaStream_t stream) const {
        size_t pitch = size_t(packed_width()) * sizeof(float), sw = size_t(d / 128) * sizeof(float);
        if (rows == 0) return;
        DUPLEX_CUDA_CHECK(cudaMemcpy2DAsync(packed, pitch, R.q.get(), d, d, rows, cudaMemcpyDeviceToDevice, stream));
        DUPLEX_CUDA_CHECK(cudaMemcpy2DAsync(reinterpret_cast<char*>(packed) + d, pitch, R.scales.get(), sw, sw, rows,
                                            cudaMemcpyDeviceToDevice, stream));
    }
    void unpack(const float* packed, int rows, Rank& R, cudaStream_t stream) const {
        size_t pitch = size_t(packed_width()) * sizeof(float), sw = size_t(d / 128) * sizeof(float);
        if (rows == 0) return;
        DUPLEX_CUDA_CHECK(cudaMemcpy2DAsync(R.q.get(), d, packed, pitch, d, rows, cudaMemcpyDeviceToDevice, stream));
        DUPLEX_CUDA_CHECK(cudaMemcpy2DAsync(R.scales.get(), sw, reinterpret_cast<const char*>(packed) + d, pitch, sw,
                                            rows, cudaMemcpyDeviceToDevice, stream));
    }

    int64_t count(const Micro& m, int src, int expert) const { return m.ranks[src].layout.counts[expert]; }

    ~Impl() {
        release();
        if (comm) cudaStreamDestroy(comm);
        if (compute) cudaStreamDestroy(compute);
    }
    void release() {
        for (auto& m : mbs) {
            if (m.dispatched) cudaEventDestroy(m.dispatched);
            if (m.computed) cudaEventDestroy(m.computed);
        }
        mbs.clear();
    }

    void setup(const std::vector<std::vector<MoeRankInput>>& in) {
        release();
        mbs.resize(in.size());
        for (size_t i = 0; i < in.size(); ++i) {
            Micro& m = mbs[i];
            DUPLEX_CUDA_CHECK(cudaEventCreateWithFlags(&m.dispatched, cudaEventDisableTiming));
            DUPLEX_CUDA_CHECK(cudaEventCreateWithFlags(&m.computed, cudaEventDisableTiming));
            DUPLEX_CHECK_ARG(int(in[i].size()) == V, "device moe", "microbatch {} has inputs for {} ranks, not {}", i,
                             in[i].size(), V);
            m.ranks.resize(V);
            for (int s = 0; s < V; ++s) {
                const MoeRankInput& r = in[i][s];
                Rank& R = m.ranks[s];
                DUPLEX_CHECK_ARG(r.x.size() % size_t(d) == 0, "device moe", "rank {}: {} values are not rows of {}", s,
                                 r.x.size(), d);
                R.tokens = int(r.x.size() / d);
                size_t slots = size_t(R.tokens) * K;
                DUPLEX_CHECK_ARG(r.expert.size() == slots && r.gate.size() == slots, "device moe",
                                 "rank {}: {} experts and {} gates for {} slots", s, r.expert.size(), r.gate.size(), slots);
                R.layout = kernels::dispatch_layout(r.expert, o.experts);  // ConfigError for an expert out of range
                R.dl = std::make_unique<cuda::DeviceLayout>(R.layout);
                std::vector<int> src(slots);
                for (size_t j = 0; j < slots; ++j) src[j] = int(j / K);
                R.src_row = DeviceArray<int>(slots), R.src_row.upload(src.data(), slots, compute);
                R.gates = DeviceArray<float>(slots), R.gates.upload(r.gate.data(), slots, compute);
                std::vector<float> one(slots, 1.0f);
                R.ones = DeviceArray<float>(slots), R.ones.upload(one.data(), slots, compute);
                R.x = DeviceArray<float>(r.x.size()), R.x.upload(r.x.data(), r.x.size(), compute);
                R.send = DeviceArray<float>(slots * d), R.back = DeviceArray<float>(slots * d);
                R.dgate = DeviceArray<float>(slots), R.y = DeviceArray<float>(r.x.size());
                if (o.fp8_dispatch) {
                    R.x8 = DeviceArray<float>(size_t(R.tokens) * packed_width());
                    R.send8 = DeviceArray<float>(slots * packed_width());
                }
                if (o.bf16) R.send16 = DeviceArray<uint16_t>(slots * d), R.back16 = DeviceArray<uint16_t>(slots * d);
            }
            for (int dst = 0; dst < V; ++dst) {
                Rank& D = m.ranks[dst];
                D.expert_off.assign(per + 1, 0);
                D.block_off.assign(V, std::vector<int64_t>(per, 0));
                int64_t at = 0;
                for (int le = 0; le < per; ++le) {
                    D.expert_off[le] = at;
                    for (int s = 0; s < V; ++s) D.block_off[s][le] = at, at += count(m, s, dst * per + le);
                }
                D.expert_off[per] = D.rows_in = at;
                // The expert side's rows and activations, in the experts' type (fp32 arrivals also for FP8, which
                // are dequantized there).
                size_t nd = size_t(D.rows_in) * d, nf = size_t(D.rows_in) * f;
                if (!o.bf16 || o.fp8_dispatch) D.recv = DeviceArray<float>(nd);
                if (o.bf16) {
                    for (auto* b : {&D.recv16, &D.outh, &D.dxrh}) *b = DeviceArray<uint16_t>(nd);
                    for (auto* b : {&D.a1h, &D.a3h, &D.sh, &D.dsh, &D.da1h, &D.da3h}) *b = DeviceArray<uint16_t>(nf);
                } else {
                    D.out = DeviceArray<float>(nd), D.dxr = DeviceArray<float>(nd);
                    for (auto* b : {&D.a1, &D.a3, &D.s, &D.ds, &D.da1, &D.da3}) *b = DeviceArray<float>(nf);
                }
                if (o.fp8_dispatch) {
                    size_t rows = size_t(std::max<int64_t>(D.rows_in, D.tokens));
                    D.q = DeviceArray<uint8_t>(rows * d), D.scales = DeviceArray<float>(rows * (d / 128));
                    D.recv8 = DeviceArray<float>(size_t(D.rows_in) * packed_width());
                }
            }
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(compute));
    }

    // Calls fn(expert, its first row in the destination's buffers, rows) for each local expert of `dst` with rows.
    template <typename Fn>
    void for_blocks(const Micro& m, int dst, Fn&& fn) const {
        const Rank& D = m.ranks[dst];
        for (int le = 0; le < per; ++le) {
            int64_t rows = D.expert_off[le + 1] - D.expert_off[le];
            if (rows) fn(dst * per + le, D.expert_off[le], int(rows));
        }
    }

    // The (source, expert) blocks between the token side (the send layout: grouped by expert) and the expert side
    // (expert-major), as exchange segments from the token side (to_experts) or back (!to_experts).
    std::vector<cuda::RowSegment> blocks(const Micro& m, bool to_experts) const {
        std::vector<cuda::RowSegment> segments;
        for (int s = 0; s < V; ++s)
            for (int dst = 0; dst < V; ++dst)
                for (int le = 0; le < per; ++le) {
                    int e = dst * per + le;
                    int64_t rows = count(m, s, e), token_row = m.ranks[s].layout.offsets[e];
                    int64_t expert_row = m.ranks[dst].block_off[s][le];
                    if (rows == 0) continue;
                    if (to_experts)
                        segments.push_back({s, dst, token_row, expert_row, rows});
                    else
                        segments.push_back({dst, s, expert_row, token_row, rows});
                }
        return segments;
    }

    // Token rows (or their gradients) of every rank to the experts' ranks: src_buf[s] in layout order ->
    // dst_buf[d] expert-major; or back (to_tokens). Rows of any element type move as 32-bit words: `width` of
    // them per row.
    template <typename E>
    double to_experts(Micro& m, DeviceArray<E> Rank::*src_buf, DeviceArray<E> Rank::*dst_buf, int width) {
        return move_blocks(m, src_buf, dst_buf, width, true);
    }
    template <typename E>
    double to_tokens(Micro& m, DeviceArray<E> Rank::*src_buf, DeviceArray<E> Rank::*dst_buf, int width) {
        return move_blocks(m, src_buf, dst_buf, width, false);
    }
    template <typename E>
    double move_blocks(Micro& m, DeviceArray<E> Rank::*src_buf, DeviceArray<E> Rank::*dst_buf, int width,
                       bool to_experts) {
        std::vector<const float*> send;
        std::vector<float*> recv;
        std::vector<int64_t> cap(V);
        for (int r = 0; r < V; ++r) {
            send.push_back(reinterpret_cast<const float*>((m.ranks[r].*src_buf).get()));
            recv.push_back(reinterpret_cast<float*>((m.ranks[r].*dst_buf).get()));
            cap[r] = to_experts ? m.ranks[r].rows_in : m.ranks[r].layout.num_rows();
        }
        return cuda::exchange_segments(send, recv, blocks(m, to_experts), cap, width, o.exchange, comm);
    }

    // Microbatch i+1 goes to the experts (comm stream) while microbatch i's experts compute (compute stream);
    // i's way back waits for its experts. Returns the wall time of the whole.
    template <typename ToExperts, typename Compute, typename Back>
    double pipeline(bool serial, ToExperts&& to_experts_of, Compute&& compute_of, Back&& back_of) {
        double start = now_s();
        auto back = [&](Micro& m) {
            DUPLEX_CUDA_CHECK(cudaStreamWaitEvent(comm, m.computed, 0));
            back_of(m);
        };
        for (size_t i = 0; i < mbs.size(); ++i) {
            Micro& m = mbs[i];
            to_experts_of(m);
            DUPLEX_CUDA_CHECK(cudaEventRecord(m.dispatched, comm));
            DUPLEX_CUDA_CHECK(cudaStreamWaitEvent(compute, m.dispatched, 0));
            compute_of(m);
            DUPLEX_CUDA_CHECK(cudaEventRecord(m.computed, compute));
            if (i > 0) back(mbs[i - 1]);
            if (serial) DUPLEX_CUDA_CHECK(cudaStreamSynchronize(compute));
        }
        if (!mbs.empty()) back(mbs.back());
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(comm));
        return now_s() - start;
    }

    // The expert side's buffers in one element type and that type's weights: fp32, or BF16 bit patterns (whose
    // weight gradients still add up in fp32).
    template <typename E>
    struct ExpertMath {
        DeviceArray<E> Rank::*x, Rank::*a1, Rank::*a3, Rank::*s, Rank::*out, Rank::*ds, Rank::*da1, Rank::*da3,
            Rank::*dx;
        const DeviceArray<E>*w1, *w3, *w2;
    };
    ExpertMath<float> f32_math() const {
        return {&Rank::recv, &Rank::a1, &Rank::a3, &Rank::s, &Rank::out, &Rank::ds, &Rank::da1, &Rank::da3, &Rank::dxr,
                &w1, &w3, &w2};
    }
    ExpertMath<uint16_t> bf16_math() const {
        return {&Rank::recv16, &Rank::a1h, &Rank::a3h, &Rank::sh, &Rank::outh, &Rank::dsh, &Rank::da1h, &Rank::da3h,
                &Rank::dxrh, &w1h, &w3h, &w2h};
    }

    // Rows in D.*x -> D.*out.
    template <typename E>
    void experts_forward(Micro& m, const ExpertMath<E>& x) {
        const size_t wsz = size_t(d) * f;
        for (int dst = 0; dst < V; ++dst) {
            Rank& D = m.ranks[dst];
            for_blocks(m, dst, [&](int e, int64_t at, int rows) {
                mlp_gemm(false, false, rows, f, d, 0, (D.*x.x).at(at * d), x.w1->at(wsz * e), (D.*x.a1).at(at * f), compute);
                mlp_gemm(false, false, rows, f, d, 0, (D.*x.x).at(at * d), x.w3->at(wsz * e), (D.*x.a3).at(at * f), compute);
            });
            mlp_swiglu(D.*x.a1, D.*x.a3, size_t(D.rows_in) * f, D.*x.s, compute);
            for_blocks(m, dst, [&](int e, int64_t at, int rows) {
                mlp_gemm(false, false, rows, d, f, 0, (D.*x.s).at(at * f), x.w2->at(wsz * e), (D.*x.out).at(at * d), compute);
            });
        }
    }

    // d out (in D.*out) -> d input rows (in D.*dx); the weight gradients add up in fp32 (one GEMM per expert and
    // weight).
    template <typename E>
    void experts_backward(Micro& m, const ExpertMath<E>& x) {
        const size_t wsz = size_t(d) * f;
        for (int dst = 0; dst < V; ++dst) {
            Rank& D = m.ranks[dst];
            size_t n = size_t(D.rows_in) * f;
            mlp_swiglu(D.*x.a1, D.*x.a3, n, D.*x.s, compute);  // recomputed
            for_blocks(m, dst, [&](int e, int64_t at, int rows) {
                mlp_gemm(false, true, rows, f, d, 0, (D.*x.out).at(at * d), x.w2->at(wsz * e), (D.*x.ds).at(at * f), compute);
            });
            mlp_swiglu_backward(D.*x.ds, D.*x.a1, D.*x.a3, n, D.*x.da1, D.*x.da3, compute);
            for_blocks(m, dst, [&](int e, int64_t at, int rows) {
                const E *xr = (D.*x.x).at(at * d), *da1 = (D.*x.da1).at(at * f), *da3 = (D.*x.da3).at(at * f);
                mlp_gemm(false, true, rows, d, f, 0, da1, x.w1->at(wsz * e), (D.*x.dx).at(at * d), compute);
                mlp_gemm(false, true, rows, d, f, 1, da3, x.w3->at(wsz * e), (D.*x.dx).at(at * d), compute);
                mlp_gemm(true, false, d, f, rows, 1, xr, da1, g1.at(wsz * e), compute);
                mlp_gemm(true, false, d, f, rows, 1, xr, da3, g3.at(wsz * e), compute);
                mlp_gemm(true, false, f, d, rows, 1, (D.*x.s).at(at * f), (D.*x.out).at(at * d), g2.at(wsz * e), compute);
            });
        }
    }
};

DeviceMoeLayer::DeviceMoeLayer(const DeviceMoeOptions& o, const std::vector<std::vector<float>>& w1,
                               const std::vector<std::vector<float>>& w3, const std::vector<std::vector<float>>& w2)
    : impl_(std::make_unique<Impl>()) {
    Impl& I = *impl_;
    I.o = o;
    DUPLEX_CHECK_ARG(o.ranks >= 1 && o.experts >= 1 && o.experts % o.ranks == 0, "device moe",
                     "{} experts do not split over {} ranks", o.experts, o.ranks);
    DUPLEX_CHECK_ARG(o.hidden >= 1 && o.ffn >= 1 && o.top_k >= 1 && o.top_k <= o.experts, "device moe",
                     "bad shape: hidden {}, ffn {}, top-{} of {}", o.hidden, o.ffn, o.top_k, o.experts);
    DUPLEX_CHECK_ARG(!o.fp8_dispatch || o.hidden % 128 == 0, "device moe: fp8 dispatch",
                     "hidden {} is not a multiple of the 128-wide FP8 tiles", o.hidden);
    DUPLEX_CHECK_ARG(!o.bf16 || o.hidden % 2 == 0, "device moe: bf16",
                     "hidden {} is odd (BF16 rows cross the exchange as 32-bit words)", o.hidden);
    size_t wsz = size_t(o.hidden) * o.ffn;
    DUPLEX_CHECK_ARG(int(w1.size()) == o.experts && int(w3.size()) == o.experts && int(w2.size()) == o.experts,
                     "device moe", "weights for {}/{}/{} experts, expected {}", w1.size(), w3.size(), w2.size(), o.experts);
    for (int e = 0; e < o.experts; ++e)
        DUPLEX_CHECK_ARG(w1[e].size() == wsz && w3[e].size() == wsz && w2[e].size() == wsz, "device moe",
                         "expert {}: weights of {}/{}/{} values, expected {}", e, w1[e].size(), w3[e].size(), w2[e].size(),
                         wsz);
    auto devices = cuda_devices();
    if (devices.empty()) throw ConfigError("device moe", "no CUDA device on this machine");
    DUPLEX_CHECK_ARG(o.device >= 0 && o.device < int(devices.size()), "device moe", "device {} of {}", o.device,
                     devices.size());
    // The exchange's own checks with the row counts unknown yet: the SM budget.
    cuda::check_exchange(o.ranks, std::vector<std::vector<int64_t>>(o.ranks, std::vector<int64_t>(o.ranks, 0)),
                         std::vector<int64_t>(o.ranks, 0), o.hidden, o.exchange, devices[o.device].num_sms);
    I.V = o.ranks, I.per = ExpertPlacement(o.experts, o.ranks).per_rank(), I.d = o.hidden, I.f = o.ffn, I.K = o.top_k;
    DUPLEX_CUDA_CHECK(cudaSetDevice(o.device));
    DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&I.comm, cudaStreamNonBlocking));
    DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&I.compute, cudaStreamNonBlocking));
    size_t all = wsz * o.experts;
    I.w1 = DeviceArray<float>(all), I.w3 = DeviceArray<float>(all), I.w2 = DeviceArray<float>(all);
    I.g1 = DeviceArray<float>(all), I.g3 = DeviceArray<float>(all), I.g2 = DeviceArray<float>(all);
    for (int e = 0; e < o.experts; ++e) {
        I.w1.upload(w1[e].data(), wsz, I.compute, wsz * e);
        I.w3.upload(w3[e].data(), wsz, I.compute, wsz * e);
        I.w2.upload(w2[e].data(), wsz, I.compute, wsz * e);
    }
    for (auto* g : {&I.g1, &I.g3, &I.g2}) DUPLEX_CUDA_CHECK(cudaMemsetAsync(g->get(), 0, all * sizeof(float), I.compute));
    if (o.bf16) {
        I.w1h = DeviceArray<uint16_t>(all), I.w3h = DeviceArray<uint16_t>(all), I.w2h = DeviceArray<uint16_t>(all);
        cuda::to_bf16(I.w1.get(), all, I.w1h.get(), I.compute);
        cuda::to_bf16(I.w3.get(), all, I.w3h.get(), I.compute);
        cuda::to_bf16(I.w2.get(), all, I.w2h.get(), I.compute);
    }
    DUPLEX_CUDA_CHECK(cudaStreamSynchronize(I.compute));
}

DeviceMoeLayer::~DeviceMoeLayer() = default;

MoeTiming DeviceMoeLayer::forward(const std::vector<std::vector<MoeRankInput>>& in,
                                  std::vector<std::vector<std::vector<float>>>& y) {
    Impl& I = *impl_;
    DUPLEX_CUDA_CHECK(cudaSetDevice(I.o.device));
    I.setup(in);
    const int M = int(I.mbs.size()), V = I.V, d = I.d;
    using Rank = Impl::Rank;
    MoeTiming t;
    t.seconds = I.pipeline(
        serial_,
        [&](Impl::Micro& m) {  // permute and dispatch (quantized to FP8 first, dequantized on arrival)
            if (!I.o.fp8_dispatch) {
                for (Rank& R : m.ranks) {
                    cuda::permute_rows(R.x.get(), d, R.src_row.get(), *R.dl, R.send.get(), I.comm);
                    if (I.o.bf16) cuda::to_bf16(R.send.get(), R.send16.size(), R.send16.get(), I.comm);
                }
                t.exchange_seconds += I.o.bf16 ? I.to_experts(m, &Rank::send16, &Rank::recv16, d / 2)
                                               : I.to_experts(m, &Rank::send, &Rank::recv, d);
                return;
            }
            const int w = I.packed_width();
            for (Rank& R : m.ranks) {
                cuda::quantize_fp8_1x128(R.x.get(), R.tokens, d, R.q.get(), R.scales.get(), I.comm);
                I.pack(R, R.tokens, R.x8.get(), I.comm);
                cuda::permute_rows(R.x8.get(), w, R.src_row.get(), *R.dl, R.send8.get(), I.comm);
            }
            t.exchange_seconds += I.to_experts(m, &Rank::send8, &Rank::recv8, w);
            for (Rank& D : m.ranks) {
                I.unpack(D.recv8.get(), int(D.rows_in), D, I.comm);
                cuda::dequantize_fp8_1x128(D.q.get(), D.scales.get(), int(D.rows_in), d, D.recv.get(), I.comm);
                if (I.o.bf16) cuda::to_bf16(D.recv.get(), D.recv16.size(), D.recv16.get(), I.comm);
            }
        },
        [&](Impl::Micro& m) {
            if (I.o.bf16)
                I.experts_forward(m, I.bf16_math());
            else
                I.experts_forward(m, I.f32_math());
        },
        [&](Impl::Micro& m) {  // outputs back, gate-weighted sum per token in slot order
            if (I.o.bf16) {
                t.exchange_seconds += I.to_tokens(m, &Rank::outh, &Rank::back16, d / 2);
                for (Rank& R : m.ranks) cuda::from_bf16(R.back16.get(), R.back16.size(), R.back.get(), I.comm);
            } else {
                t.exchange_seconds += I.to_tokens(m, &Rank::out, &Rank::back, d);
            }
            for (Rank& R : m.ranks)
                cuda::combine_rows(R.back.get(), d, *R.dl, R.gates.get(), R.tokens, I.K, R.y.get(), I.comm);
        });
    y.assign(M, std::vector<std::vector<float>>(V));
    for (int i = 0; i < M; ++i)
        for (int s = 0; s < V; ++s) {
            Rank& R = I.mbs[i].ranks[s];
            y[i][s].resize(size_t(R.tokens) * d);
            R.y.download(y[i][s].data(), y[i][s].size(), I.comm);
        }
    DUPLEX_CUDA_CHECK(cudaStreamSynchronize(I.comm));
    return t;
}

MoeTiming DeviceMoeLayer::backward(const std::vector<std::vector<std::vector<float>>>& dy,
                                   std::vector<std::vector<std::vector<float>>>& dx,
                                   std::vector<std::vector<std::vector<float>>>& d_gate) {
    Impl& I = *impl_;
    DUPLEX_CUDA_CHECK(cudaSetDevice(I.o.device));
    const int M = int(I.mbs.size()), V = I.V, d = I.d, K = I.K;
    using Rank = Impl::Rank;
    DUPLEX_CHECK_ARG(int(dy.size()) == M, "device moe", "{} gradients for the {} microbatches of the last forward",
                     dy.size(), M);
    // Upload dy into x's place (x is not needed any more).
    for (int i = 0; i < M; ++i) {
        DUPLEX_CHECK_ARG(int(dy[i].size()) == V, "device moe", "microbatch {}: gradients for {} ranks", i, dy[i].size());
        for (int s = 0; s < V; ++s) {
            Rank& R = I.mbs[i].ranks[s];
            DUPLEX_CHECK_ARG(dy[i][s].size() == size_t(R.tokens) * d, "device moe", "rank {}: {} gradient values for {} "
                             "tokens", s, dy[i][s].size(), R.tokens);
            R.x.upload(dy[i][s].data(), dy[i][s].size(), I.comm);
        }
    }
    DUPLEX_CUDA_CHECK(cudaStreamSynchronize(I.comm));
    MoeTiming t;
    t.seconds = I.pipeline(
        serial_,
        [&](Impl::Micro& m) {  // combine backward: d out = gate * dy per slot, d gate = dy . out; to the experts
            for (Rank& R : m.ranks) {
                cuda::slot_dots(R.x.get(), R.back.get(), d, *R.dl, R.tokens, K, R.dgate.get(), I.comm);
                cuda::permute_rows(R.x.get(), d, R.src_row.get(), *R.dl, R.send.get(), I.comm);
                cuda::gate_rows(R.send.get(), d, *R.dl, R.gates.get(), I.comm);
                if (I.o.bf16) cuda::to_bf16(R.send.get(), R.send16.size(), R.send16.get(), I.comm);
            }
            t.exchange_seconds += I.o.bf16 ? I.to_experts(m, &Rank::send16, &Rank::outh, d / 2)
                                           : I.to_experts(m, &Rank::send, &Rank::out, d);
        },
        [&](Impl::Micro& m) {
            if (I.o.bf16)
                I.experts_backward(m, I.bf16_math());
            else
                I.experts_backward(m, I.f32_math());
        },
        [&](Impl::Micro& m) {  // input-row gradients back; dx[t] = their sum over the token's slots (gates 1)
            if (I.o.bf16) {
                t.exchange_seconds += I.to_tokens(m, &Rank::dxrh, &Rank::send16, d / 2);
                for (Rank& R : m.ranks) cuda::from_bf16(R.send16.get(), R.send16.size(), R.send.get(), I.comm);
            } else {
                t.exchange_seconds += I.to_tokens(m, &Rank::dxr, &Rank::send, d);
            }
            for (Rank& R : m.ranks)
                cuda::combine_rows(R.send.get(), d, *R.dl, R.ones.get(), R.tokens, K, R.y.get(), I.comm);
        });
    dx.assign(M, std::vector<std::vector<float>>(V));
    d_gate.assign(M, std::vector<std::vector<float>>(V));
    for (int i = 0; i < M; ++i)
        for (int s = 0; s < V; ++s) {
            Rank& R = I.mbs[i].ranks[s];
            dx[i][s].resize(size_t(R.tokens) * d);
            R.y.download(dx[i][s].data(), dx[i][s].size(), I.comm);
            d_gate[i][s].resize(size_t(R.tokens) * K);
            R.dgate.download(d_gate[i][s].data(), d_gate[i][s].size(), I.comm);
        }
    DUPLEX_CUDA_CHECK(cudaStreamSynchronize(I.comm));
    I.release();
    return t;
}

void DeviceMoeLayer::grads(std::vector<std::vector<float>>& g1, std::vector<std::vector<float>>& g3,
                           std::vector<std::vector<float>>& g2) const {
    const Impl& I = *impl_;
    size_t wsz = size_t(I.d) * I.f;
    for (auto* g : {&g1, &g3, &g2}) g->assign(I.o.experts, std::vector<float>(wsz));
    for (int e = 0; e < I.o.experts; ++e) {
        I.g1.download(g1[e].data(), wsz, I.compute, wsz * e);
        I.g3.download(g3[e].data(), wsz, I.compute, wsz * e);
        I.g2.download(g2[e].data(), wsz, I.compute, wsz * e);
    }
    DUPLEX_CUDA_CHECK(cudaStreamSynchronize(I.compute));
}

}  // namespace duplex
