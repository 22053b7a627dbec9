// Internal to runtime/: the state of a PipelineTrainer rank, shared by the math step (pipeline_trainer.cpp)
// and the emulate step (emulate.cpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "memory/ema.hpp"
#include "runtime/model/router.hpp"
#include "runtime/pipeline_trainer.hpp"

namespace duplex {

using sched::Chunk;
using sched::Instr;
using sched::Op;
using sched::ScheduleKind;

namespace pipeline_detail {
template <typename T>
inline DType dtype_of() {
    return sizeof(T) == 4 ? DType::F32 : DType::F64;
}

struct Interval {
    double start, end;
};

// Time of `comm` intervals covered by the union of `compute` intervals, and their total time.
inline std::pair<double, double> hidden_time(const std::vector<Interval>& comm, std::vector<Interval> compute) {
    std::sort(compute.begin(), compute.end(), [](const Interval& a, const Interval& b) { return a.start < b.start; });
    std::vector<Interval> merged;
    for (const Interval& c : compute) {
        if (!merged.empty() && c.start <= merged.back().end)
            merged.back().end = std::max(merged.back().end, c.end);
        else
            merged.push_back(c);
    }
    double hidden = 0, total = 0;
    for (const Interval& w : comm) {
        total += w.end - w.start;
        for (const Interval& c : merged) {
            if (c.start >= w.end) break;
            hidden += std::max(0.0, std::min(w.end, c.end) - std::max(w.start, c.start));
        }
    }
    return {hidden, total};
}

inline double steady_seconds() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }
inline void sleep_until_seconds(double t) {
    std::this_thread::sleep_until(
        Clock::time_point(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(t))));
}
}  // namespace pipeline_detail

using namespace pipeline_detail;

template <typename T>
struct PipelineTrainer<T>::Impl {
    PipelineOptions p;
    TrainOptions o;
    ModelConfig cfg;
    std::shared_ptr<Communicator> world, pipe, pair, ep_bwd;
    GroupComms groups;
    RankGrid grid;
    sched::Schedule schedule;
    int prank = 0;  // rank inside the pipeline
    SyntheticTask task;
    std::map<int, std::unique_ptr<ModelStage<T>>> stages;          // by model stage id
    // By model stage id: ZeRO-1 for the dense parameters over DP and for the routed experts over expert-DP.
    std::map<int, std::vector<std::unique_ptr<Zero1AdamW<T>>>> optimizers;
    std::map<int, bool> owner;                                     // stage id -> this copy counts for norms
    std::set<int> emulated_stages;                                 // emulate mode: the stages placed here
    std::mutex shared;  // the two halves of an overlapped F&B pair share the handoff maps and the send list
    std::map<std::pair<int, int>, std::vector<T>> local_act, local_grad;  // same-rank handoffs (DualPipeV)
    int step_ = 0;
    Tracer tracer;
    std::unique_ptr<CpuEma<T>> ema;
    std::vector<Param<T>*> ema_params;  // owned parameters, in EMA order

    // This step's compute and communication-wait intervals (us), for the comm-hidden shares.
    std::mutex spans_mutex;
    std::vector<Interval> compute_iv, comm_iv, fb_ep_iv;
    void note(std::vector<Interval>& v, double t0, double t1) {
        std::lock_guard<std::mutex> lock(spans_mutex);
        v.push_back({t0, t1});
    }

    // Emulate mode with EP > 1.
    bool hierarchical = false;
    std::mutex gpu;              // one compute stream: the two halves of an F&B pair take turns
    LinkBytes emulated_ep_bytes;  // nominal expert-exchange bytes sent (payloads are elided)
    struct EpPlan {               // nominal bytes per EP peer of the four hops (see ep_plan)
        std::vector<double> to_relay, to_expert, from_expert, from_relay, meta, gates;
    };
    std::map<std::tuple<int, int, int>, EpPlan> ep_plans;  // by (direction, microbatch, layer)

    Impl(std::shared_ptr<Communicator> w, const PipelineOptions& po, const TrainOptions& to)
        : p(po), o(to), cfg(to.model_config()), world(std::move(w)), task(cfg.vocab, cfg.seq_len, to.seed),
          tracer(world->rank(), po.trace) {}

    int stage_first_layer(int s) const { return s * cfg.layers / p.pp; }
    int stage_num_layers(int s) const { return stage_first_layer(s + 1) - stage_first_layer(s); }
    int global_mb(int mb) const { return grid.dp_index * o.microbatches + mb; }

    Batch batch_of(int mb) const {
        uint64_t batch_seed = (o.seed * 1000003ull + uint64_t(step_)) * 1009ull + uint64_t(global_mb(mb));
        return task.batch(o.sequences_per_microbatch, batch_seed, o.token_skew);
    }
    size_t act_size() const { return size_t(o.sequences_per_microbatch) * cfg.seq_len * cfg.hidden; }

    // The schedule's idle share: 1 - compute / (the slowest rank's schedule time), averaged over the world.
    double bubble_share(double schedule_us, double compute_us, double& slowest_us) {
        double vals[2] = {schedule_us, compute_us};
        std::vector<double> all(2 * size_t(world->size()));
        world->all_gather(vals, all.data(), sizeof(vals))->wait();
        slowest_us = 0;
        for (int r = 0; r < world->size(); ++r) slowest_us = std::max(slowest_us, all[2 * r]);
        double idle = 0;
        for (int r = 0; r < world->size(); ++r)
            idle += slowest_us > 0 ? std::max(0.0, 1.0 - all[2 * r + 1] / slowest_us) : 0.0;
        return idle / world->size();
    }

    // Fills the comm-hidden shares (summed over the world) and clears this step's intervals.
    void hidden_shares(StepMetrics& m) {
        auto [h, t] = hidden_time(comm_iv, compute_iv);
        auto [fh, ft] = hidden_time(fb_ep_iv, compute_iv);
        double v[4] = {h, t, fh, ft};
        world->all_reduce(v, 4, DType::F64)->wait();
        m.comm_hidden_fraction = v[1] > 0 ? v[0] / v[1] : std::nan("");
        m.fb_ep_comm_hidden_fraction = v[3] > 0 ? v[2] / v[3] : std::nan("");
        compute_iv.clear(), comm_iv.clear(), fb_ep_iv.clear();
    }

    std::vector<T> receive(const Chunk& producer, bool gradient, std::vector<WorkPtr>&) {
        int from = schedule.rank_of(producer.stage, producer.dir);
        auto key = std::make_pair(producer.mb, producer.stage);
        if (from == prank) {
            std::lock_guard<std::mutex> lock(shared);
            auto& store = gradient ? local_grad : local_act;
            auto it = store.find(key);
            if (it == store.end())
                throw Error(fmt::format("rank {}: local {} of mb {} stage {} missing", prank,
                                        gradient ? "gradient" : "activation", producer.mb, producer.stage));
            std::vector<T> v = std::move(it->second);
            store.erase(it);
            return v;
        }
        std::vector<T> buf(act_size());
        double t0 = tracer.now_us();
        pipe->irecv(buf.data(), buf.size() * sizeof(T), from, sched::p2p_tag(schedule, producer, gradient))->wait();
        double t1 = tracer.now_us();
        tracer.add(Lane::Comm, fmt::format("recv {} mb {} from stage {}", gradient ? "grad" : "act", producer.mb,
                                           producer.stage), t0, t1);
        note(comm_iv, t0, t1);
        return buf;
    }

    void send(const Chunk& producer, bool gradient, int to_stage, std::vector<T>&& data,
              std::vector<std::pair<WorkPtr, std::shared_ptr<std::vector<T>>>>& pending) {
        int to = schedule.rank_of(to_stage, producer.dir);
        std::lock_guard<std::mutex> lock(shared);
        if (to == prank) {
            (gradient ? local_grad : local_act)[{producer.mb, producer.stage}] = std::move(data);
            return;
        }
        auto buf = std::make_shared<std::vector<T>>(std::move(data));
        auto w = pipe->isend(buf->data(), buf->size() * sizeof(T), to, sched::p2p_tag(schedule, producer, gradient));
        pending.push_back({w, buf});
    }
};

}  // namespace duplex
