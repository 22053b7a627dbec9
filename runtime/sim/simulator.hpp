// The simulator: a discrete-event replay of the executor's own instruction lists (parallel/schedule) against
// the shared cost model (runtime/cost_model), for thousands of GPUs in milliseconds. It answers "what does this
// model cost on that cluster with this parallel layout": step time, bubbles, exposed communication by kind,
// MFU, tokens/s/GPU, GPU-hours per trillion tokens and memory per GPU by category.
//
//   ClusterConfig cl = ClusterConfig::preset("h800x2048");
//   SimOptions o;  o.schedule = sched::ScheduleKind::DualPipe;  o.pp = 16;  o.ep = 64;
//   SimResult r = simulate(ModelConfig::preset("deepseek-v3"), cl, o);   // ConfigError for a bad layout
//
// What each instruction costs (one pipeline, the busiest stage of each op):
//   F, B, W, BW  compute from the cost model + every expert exchange of the chunk, not overlapped (the executor
//                runs a lone chunk's dispatch and combine in line);
//   FB           max(compute of both chunks, expert exchanges of both chunks): the executor interleaves the two
//                chunks at their exchanges, so communication below compute is hidden;
//   transfers    activation/gradient bytes over the link between the two stages' ranks.
// An expert exchange per MoE layer and direction (dispatch, combine; their gradients in backward) follows the
// executor: flat = one round, max over link classes of latency + bytes / bandwidth; hierarchical = the
// inter-node round and the intra-node one, pipelined (max, as GPU kernels forward) or one after the other (sum,
// as the CPU executor's rounds). Byte counts come from a sampled node-limited routing of the
// model (distinct nodes per token, slots per node). At step end the DualPipe copies' gradients are summed
// and ZeRO-1 reduce-scatters gradients and all-gathers weights over DP (experts over expert-DP) as rings, each
// stage's as soon as its last weight gradient is done (runtime/sim/step_end.cpp). Tensor and context parallelism
// divide a chunk's compute and add their exposed communication (runtime/sim/layout.hpp).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "parallel/schedule.hpp"
#include "runtime/sim/cost_model.hpp"
#include "runtime/sim/layout.hpp"
#include "runtime/model/config.hpp"

namespace duplex {

struct ClusterConfig {
    std::string name;
    DevicePreset device;
    int gpus = 0;
    // "h800x2048" (256 nodes of 8 H800), "<device>x<gpus>" for any device preset (h800, h100, h200), or a .json
    // file {"device": preset name or object, "gpus": N}. ConfigError otherwise.
    static ClusterConfig preset(const std::string& name);
    int nodes() const { return gpus / device.gpus_per_node; }
};

struct SimOptions {
    sched::ScheduleKind schedule = sched::ScheduleKind::DualPipe;
    int pp = 16;               // model stages (DualPipeV: on pp/2 ranks; interleaved: on pp/vpp)
    int vpp = 1;               // interleaved: model stages per rank
    int ep = 64;
    int tp = 1;                // tensor parallel with sequence parallelism, inside a node (runtime/sim/layout.hpp)
    int cp = 1;                // context parallel (ring attention)
    int etp = 1;               // the routed experts' tensor parallel, apart from tp
    int seq_len = 0;           // tokens per sequence; 0: the model's
    int global_batch = 15360;  // sequences per step (DeepSeek-V3's after its batch-size ramp)
    int mb_sequences = 1;      // sequences per microbatch
    int microbatches = 0;      // per DP replica; 0: global_batch / (DP x mb_sequences)
    bool fp8 = true;
    bool recompute = true;
    std::string dispatch = "hierarchical";  // or "flat"
    // Hierarchical exchanges: the intra-node hop overlaps the inter-node one (GPU kernels, as DeepEP) or follows
    // it (the CPU executor's two rounds).
    bool pipelined_hops = true;
    int comm_sms = -1;                      // SMs reserved for expert communication; < 0: the device's
    double elem_bytes = 2;                  // activations, gradients, combine: BF16
    // Layers per stage: "balanced" (contiguous split minimizing the slowest stage's compute, head and MTP on the
    // last stage included) or "uniform" (stage s starts at layer s * layers / PP, as the executor splits).
    std::string partition = "balanced";
    bool free_communication = false;        // every transfer and exchange costs nothing (validation)
    // A stage's gradient synchronization starts when its last weight gradient is done (false: after the pipeline).
    bool overlap_grad_sync = true;
    bool ignore_memory = false;             // simulate a layout that does not fit anyway
};

struct SimResult {
    int gpus = 0, pp = 0, dp = 0, ep = 0, edp = 0, microbatches = 0, pipeline_ranks = 0;
    int tp = 1, cp = 1, etp = 1, seq_len = 0;
    double step_time_s = 0;      // pipeline + the exposed part of the step-end gradient synchronization
    double grad_sync_s = 0;      // the gradient synchronization of the busiest rank, exposed or not
    double pipeline_s = 0;       // the schedule's makespan
    double bubble_fraction = 0;  // mean over pipeline ranks of idle / makespan
    double mfu = 0;              // model FLOPs / (step time x GPUs x BF16 peak)
    double achieved_flops_s = 0; // model FLOPs per second per GPU
    double tokens_per_s_per_gpu = 0;
    double gpu_hours_per_trillion_tokens = 0;
    double model_flops_per_token = 0;
    std::map<std::string, double> memory_per_gpu_bytes;  // busiest rank, by category
    double memory_total_bytes = 0, memory_capacity_bytes = 0;
    bool fits = true;
    // by kind: expert (EP), pipeline (P2P), data_parallel, tensor (TP), context (CP ring attention)
    std::map<std::string, double> exposed_comm_s;
    // Per stage: compute of F/B/W and the expert exchanges of a forward and of a backward chunk.
    std::vector<ChunkCosts> stage_costs;
    std::vector<int> stage_first_layer;  // S + 1 entries: stage s runs layers [first[s], first[s + 1])
    std::vector<double> stage_ep_forward_s, stage_ep_backward_s;
    std::vector<ChunkComm> stage_shard_comm;  // exposed TP and CP seconds of a chunk, included in stage_costs
    double p2p_s = 0;                 // one activation transfer between nodes
    double ep_remote_nodes_per_token = 0;  // mean distinct other nodes a token's experts sit on
    double ep_inter_bytes_per_token = 0;   // per MoE layer, dispatch direction
    sched::Schedule schedule;
    sched::Replay replay;
};

// ConfigError for a layout that cannot run (GPU count vs PP, EP vs the GPUs of a stage, batch vs DP, ...).
// A layout that does not fit in memory returns fits = false (the caller reports it) unless ignore_memory.
SimResult simulate(const ModelConfig& model, const ClusterConfig& cluster, const SimOptions& o);

// A cluster preset with the usual overrides applied: another device preset (keeping GPUs per node), the GPU
// count, GPUs per node, a time scale (each ignored when empty / <= 0). What `duplex simulate` and Python's
// duplex.simulate build.
ClusterConfig make_cluster(const std::string& preset, const std::string& device = "", int gpus = 0,
                           int gpus_per_node = 0, double time_scale = 1.0);

// The result as the JSON object `duplex simulate --json` writes (with_timing false: layout and memory only, for a
// layout that does not fit).
std::string simulation_json(const SimResult& r, const ModelConfig& m, const ClusterConfig& cl, const std::string& kind,
                            bool with_timing);

// Chrome-trace JSON of the replayed pipeline (a process per pipeline rank).
std::string sim_trace_json(const SimResult& r);

}  // namespace duplex
