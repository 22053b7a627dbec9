// The cost model shared by emulate mode (and, next, the simulator): how long a pipeline chunk computes and
// how long bytes take on a link, from the model's dimensions and a device preset.
//
//   CostModel cm = CostModel::preset("h800");          // ConfigError for an unknown name
//   ChunkCosts c = cm.chunk(cfg, layers, tokens);      // seconds, already multiplied by time_scale
//   double t = cm.transfer_s(bytes, LinkClass::InterNode);
#pragma once

#include <string>

#include "comm/topology.hpp"
#include "runtime/model/config.hpp"

namespace duplex {

struct DevicePreset {
    std::string name;
    double flops = 0;           // sustained FLOP/s of one device on this model's GEMMs
    double intra_bytes_s = 0;   // per-device bandwidth inside a node (NVLink)
    double inter_bytes_s = 0;   // per-device bandwidth between nodes (InfiniBand)
    double latency_s = 0;       // per transfer
    double time_scale = 1;      // emulate mode multiplies every duration by this (slow a cluster down to a laptop)
};

struct ChunkCosts {
    double f = 0;   // forward of one chunk
    double b = 0;   // full backward (input gradient + weight gradient)
    double w = 0;   // the weight-gradient part of b
    double fb = 0;  // an overlapped forward + backward pair
};

class CostModel {
public:
    explicit CostModel(DevicePreset device) : device_(std::move(device)) {}
    // "h800": 989 TFLOP/s BF16 peak at 40% (REFERENCE.md's achieved ~390 TFLOP/s), NVLink 160 GB/s,
    // InfiniBand 50 GB/s per GPU, 10 us per transfer; time_scale 1.
    static CostModel preset(const std::string& name);
    // Costs of `layers` layers on `tokens` tokens. Forward FLOPs count every GEMM (attention projections,
    // scores and values, dense or shared + top-K routed expert MLPs, router); the input-gradient and the
    // weight-gradient halves of backward each cost about one forward.
    ChunkCosts chunk(const ModelConfig& cfg, int layers, int tokens) const;
    double forward_flops(const ModelConfig& cfg, int layer, int tokens) const;
    // The attention part of forward_flops (projections, scores, values).
    double attention_flops(const ModelConfig& cfg, int tokens) const;
    double transfer_s(double bytes, LinkClass link) const;
    const DevicePreset& device() const { return device_; }
    DevicePreset& device() { return device_; }

private:
    DevicePreset device_;
};

}  // namespace duplex
