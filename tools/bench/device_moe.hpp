// One MoE layer's routed experts for the ranks of an expert-parallel group sharing one GPU ("virtual ranks"),
// entirely on the device: dispatch permute -> the exchange kernel on its own stream and SM budget -> each rank's
// experts (cuBLAS fp32 GEMMs and SwiGLU, or BF16 ones with fp32 masters) on the compute stream -> the exchange
// back -> the fixed-order combine; and the backward of all of it (combine backward, exchange, expert MLP backward with the weight
// gradients, exchange back, unpermute-add). Several microbatches in one call are software-pipelined the way an
// F&B pair overlaps: while microbatch i's experts compute, microbatch i+1's dispatch is on the wire.
//
// The CPU reference is the per-slot loop of tests/cuda/moe_test.cpp (gate-weighted SwiGLU MLP outputs summed in
// slot order); `duplex_bench_gpu --moe` measures the overlap.
//
//   DeviceMoeLayer layer(opts, w1, w3, w2);             // weights per global expert, row-major
//   layer.forward({input_mb0, input_mb1}, y);           // y[mb][rank]: [tokens, hidden]
//   layer.backward({dy_mb0, dy_mb1}, dx, d_gate);       // and weight gradients in layer.grads()
#pragma once

#include <memory>
#include <vector>

#include "kernels/cuda/kernels.hpp"

namespace duplex {

struct DeviceMoeOptions {
    int ranks = 8;   // virtual EP ranks; expert e lives on rank e / (experts / ranks)
    int hidden = 0, ffn = 0, experts = 0, top_k = 0;
    cuda::ExchangeConfig exchange;  // SM budget of the exchange kernel
    // Dispatch sends FP8-e4m3 tokens (1x128 tiles with fp32 scales, DeepSeek-V3's choice) and the experts take
    // the dequantized rows; combine and the gradients stay fp32. Needs hidden % 128 == 0.
    bool fp8_dispatch = false;
    // The experts' math in BF16 (cuBLAS tensor-core GEMMs with fp32 accumulation, SwiGLU on BF16 values) with fp32
    // master weights and weight gradients; rows cross the exchange in BF16 both ways. Token-side work (permute,
    // gates, combine) stays fp32. Needs an even hidden size.
    bool bf16 = false;
    int device = 0;
};

// One rank's tokens of one microbatch: x [tokens, hidden], and per slot (token * top_k + k) its expert and gate.
struct MoeRankInput {
    std::vector<float> x;
    std::vector<int> expert;
    std::vector<float> gate;
};

struct MoeTiming {
    double seconds = 0;           // the whole call, wall clock
    double exchange_seconds = 0;  // inside exchange kernels (sum over calls)
};

class DeviceMoeLayer {
public:
    // w1/w3 [experts][hidden x ffn], w2 [experts][ffn x hidden]. ConfigError for bad shapes, an expert count the
    // ranks do not divide, or an SM budget beyond the device (before anything is launched).
    DeviceMoeLayer(const DeviceMoeOptions& o, const std::vector<std::vector<float>>& w1,
                   const std::vector<std::vector<float>>& w3, const std::vector<std::vector<float>>& w2);
    ~DeviceMoeLayer();
    DeviceMoeLayer(const DeviceMoeLayer&) = delete;
    DeviceMoeLayer& operator=(const DeviceMoeLayer&) = delete;

    // in[mb][rank] -> y[mb][rank] [tokens, hidden]. Keeps each microbatch for backward (replacing older ones).
    MoeTiming forward(const std::vector<std::vector<MoeRankInput>>& in, std::vector<std::vector<std::vector<float>>>& y);
    // dy[mb][rank] -> dx[mb][rank] [tokens, hidden], d_gate[mb][rank] per slot; adds the weight gradients.
    MoeTiming backward(const std::vector<std::vector<std::vector<float>>>& dy,
                       std::vector<std::vector<std::vector<float>>>& dx,
                       std::vector<std::vector<std::vector<float>>>& d_gate);
    // Weight gradients per global expert, as the weights.
    void grads(std::vector<std::vector<float>>& g1, std::vector<std::vector<float>>& g3,
               std::vector<std::vector<float>>& g2) const;
    // Compute without exchange overlap: every microbatch's exchange waits for the previous one's experts.
    void set_serial(bool serial) { serial_ = serial; }

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
    bool serial_ = false;
};

}  // namespace duplex
