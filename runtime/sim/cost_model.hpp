// The cost model shared by emulate mode and the simulator: how long a pipeline chunk computes and how long
// bytes take on a link, from the model's dimensions and a device preset. One piece of code, so `duplex train
// --mode emulate` and `duplex simulate` agree by construction on everything but what they measure.
//
//   CostModel cm = CostModel::preset("h800");              // ConfigError for an unknown name
//   ChunkCosts c = cm.chunk(cfg, first_layer, layers, tokens, {.fp8 = true});   // seconds, x time_scale
//   double t = cm.transfer_s(bytes, LinkClass::InterNode);
//
// Compute time of a chunk = (linear-layer FLOPs / GEMM rate + attention-score FLOPs / attention rate)
// x (1 + other_overhead), where a rate = peak x (SMs left for compute / SMs) x efficiency, and FP8 GEMMs run
// fp8_gemm_speedup times faster than BF16 ones. Every number of a preset is documented where it is set
// (cost_model.cpp), with its source.
#pragma once

#include <string>

#include "comm/topology.hpp"
#include "runtime/model/config.hpp"

namespace duplex {

struct DevicePreset {
    std::string name;
    double bf16_flops = 0;            // dense BF16 tensor-core peak, FLOP/s
    double fp8_flops = 0;             // dense FP8 peak (documentation; the model uses fp8_gemm_speedup)
    int sms = 132;                    // streaming multiprocessors
    int comm_sms = 0;                 // reserved for expert-parallel communication (DeepSeek-V3: 20)
    double gemm_efficiency = 0;       // achieved share of the BF16 peak on the compute SMs, large GEMMs
    double fp8_gemm_speedup = 1;      // effective FP8 / BF16 GEMM speed with fine-grained scaling
    double attention_efficiency = 0;  // achieved share of the peak by the attention-score kernels
    double other_overhead = 0;        // norms, activations, routing, (de)quantization: fraction of GEMM time
    double intra_bytes_s = 0;         // per-GPU bandwidth inside a node (NVLink)
    double inter_bytes_s = 0;         // per-GPU bandwidth between nodes (InfiniBand)
    double latency_s = 0;             // per transfer
    int comm_sms_for_full_bandwidth = 20;  // fewer reserved SMs scale the expert-exchange bandwidth down
    double memory_bytes = 0;          // HBM per GPU
    int gpus_per_node = 8;
    double time_scale = 1;            // emulate mode multiplies every duration by this (a cluster on a laptop)

    double compute_share() const { return double(sms - comm_sms) / sms; }
    double gemm_flops_s(bool fp8) const;
    double attention_flops_s() const;
    // Bandwidth the expert exchange reaches with comm_sms reserved SMs.
    double ep_bandwidth(LinkClass link) const;
};

struct ChunkCosts {
    double f = 0;   // forward of one chunk
    double b = 0;   // full backward (input gradient + weight gradient)
    double w = 0;   // the weight-gradient part of b
    double fb = 0;  // a forward + backward pair run together (F + B: overlap gains are measured, not assumed)
};

struct ChunkOptions {
    bool fp8 = false;        // linear layers' GEMMs in FP8
    bool recompute = false;  // backward recomputes the cheap forward pieces (norms, SwiGLU, MLA up-projections)
};

// One layer's forward FLOPs on `tokens` tokens, by kind.
struct LayerFlops {
    double attn_linear = 0;  // attention projections
    double scores = 0;       // QK^T and PV (causal)
    double ffn = 0;          // dense FFN or router + shared + top-K experts
    double recompute = 0;    // what a backward with recompute runs again (MLA up-projections, experts' down-projections)
    double linear() const { return attn_linear + ffn; }
    double total() const { return attn_linear + scores + ffn; }
};

class CostModel {
public:
    explicit CostModel(DevicePreset device) : device_(std::move(device)) {}
    // "h800", "h100", "h200" (presets documented in cost_model.cpp), or a path ending in .json with
    // DevicePreset fields. ConfigError otherwise.
    static CostModel preset(const std::string& name);
    static LayerFlops layer_flops(const ModelConfig& cfg, int layer, int tokens);
    // Head (and MTP modules) of the last stage.
    static LayerFlops head_flops(const ModelConfig& cfg, int tokens);
    // Forward FLOPs of layer `layer` (all kinds), and its attention part (projections + scores).
    double forward_flops(const ModelConfig& cfg, int layer, int tokens) const;
    double attention_flops(const ModelConfig& cfg, int tokens) const;
    // Costs of layers [first, first + layers) on `tokens` tokens; with_head adds the output head and MTP.
    ChunkCosts chunk(const ModelConfig& cfg, int first, int layers, int tokens, const ChunkOptions& o = {},
                     bool with_head = false) const;
    double transfer_s(double bytes, LinkClass link) const;
    // An expert-exchange message: the bandwidth its reserved SMs reach on the link.
    double ep_transfer_s(double bytes, LinkClass link) const;
    // The same device for a layout with `ep`-way expert parallelism: without expert exchanges (ep <= 1) no SMs are
    // held back for them (comm_sms 0), every SM computes.
    CostModel for_expert_parallel(int ep) const;
    const DevicePreset& device() const { return device_; }
    DevicePreset& device() { return device_; }

private:
    DevicePreset device_;
};

}  // namespace duplex
