// Inside the simulator (not installed): what the pieces of one simulation share, and the pieces simulator.cpp and
// step_end.cpp split between them.
#pragma once

#include <vector>

#include "runtime/sim/layout.hpp"
#include "runtime/sim/simulator.hpp"

namespace duplex::sim_detail {

// The checked options, the device, its cost model, the sizes.
struct Run {
    const ModelConfig& cfg;  // with the run's sequence length
    const ClusterConfig& cl;
    const SimOptions& o;
    DevicePreset dev;
    CostModel cm;
    int S;       // model stages
    int T;       // tokens of a microbatch (every sequence, whole)
    int Tg;      // of them on one GPU: T / (TP x CP)
    int gpn;
    Shards sh;
    SimResult& r;
    int first_layer(int s) const { return r.stage_first_layer[size_t(s)]; }
    int num_layers(int s) const { return r.stage_first_layer[size_t(s) + 1] - r.stage_first_layer[size_t(s)]; }
    int stage_gpus() const { return sh.tp * sh.cp * r.dp; }  // one pipeline rank's GPUs, contiguous
    int node_of(int pipeline_rank) const { return int(int64_t(pipeline_rank) * stage_gpus() / gpn); }
    double act_bytes() const { return double(Tg) * cfg.hidden * o.elem_bytes; }  // a P2P message (SP-sharded)
    double dispatch_elem() const { return o.fp8 ? 1.0 + 4.0 / 128 : o.elem_bytes; }  // FP8 rows with their scales
};

// The step end (DualPipe's pair sum, ZeRO-1's reduce-scatter and all-gather per stage, overlapped with the
// pipeline's tail or after it) and the memory of the busiest pipeline rank: fills step_time_s, memory, fits.
void step_end_and_memory(const Run& x);
// Tokens/s/GPU, model FLOPs, MFU, GPU-hours.
void throughput(const Run& x);

}  // namespace duplex::sim_detail
