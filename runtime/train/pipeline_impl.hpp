// The private state of a PipelineTrainer (runtime/train/pipeline_trainer.hpp), shared by the files that implement
// it: pipeline_trainer.cpp (construction, the step and its step end) and pipeline_checkpoint.cpp (save, load).
#pragma once

#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <mutex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/clock.hpp"
#include "core/knobs.hpp"
#include "memory/ema.hpp"
#include "parallel/plan.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/serial_worker.hpp"
#include "runtime/train/timed_sync.hpp"
#include "runtime/sim/emulate.hpp"
#include "runtime/sim/timed_transport.hpp"
#include "runtime/exec/executor.hpp"
#include "runtime/model/builtin_stage.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

using sched::ScheduleKind;

template <typename T>
struct PipelineTrainer<T>::Impl {
    using Value = T;
    PipelineOptions p;
    TrainOptions o;
    RunPlan plan;
    bool custom = false;
    std::shared_ptr<Communicator> world, pipe, pair, ep_bwd;
    GroupComms groups;
    // EP > 1: the stages' EP group and exchange lanes, handed to every stage call (before the stages: outlives them)
    std::shared_ptr<ExpertService> expert_service;
    RankGrid grid;
    sched::Schedule schedule;
    int prank = 0;
    std::shared_ptr<const BatchSource> batches;
    std::map<int, std::unique_ptr<Stage>> stages;  // by model stage id
    std::map<int, bool> owner;                     // stage id -> this copy counts for norms and the EMA
    std::map<int, std::vector<std::unique_ptr<Zero1AdamW<T>>>> optimizers;
    // The parameters of each optimizer, in its flat order: (name, elements).
    std::map<int, std::vector<std::vector<std::pair<std::string, size_t>>>> optimizer_params;
    std::unique_ptr<PipeTransport> transport;
    std::unique_ptr<Executor> executor;
    Tracer tracer;
    std::unique_ptr<CpuEma<T>> ema;
    std::vector<std::pair<std::string, TensorView>> ema_params;  // owned parameters, in EMA order
    std::vector<bool> ema_expert;                                // ... and whether each is a routed expert's
    std::shared_ptr<EmulatedBytes> emulated_bytes = std::make_shared<EmulatedBytes>();
    std::unique_ptr<TimedGradSync> timed_sync;  // emulate mode: the step-end synchronization as timed waits
    // ZeRO-1's reduce-scatter of each stage, started on this thread as the stage's last weight gradient is done
    // (overlap_grad_sync; not with DualPipe, whose pair sum comes first); the squared norms they returned, by stage.
    std::unique_ptr<SerialWorker> reducer;
    std::mutex reduced_mu;
    std::map<int, double> reduced_sq;
    std::vector<std::pair<std::string, size_t>> stat_layout;  // the world's statistics, by name
    std::map<std::string, std::vector<double>> summed_statistics;  // the last step's
    int64_t tokens_per_microbatch = 0;                        // built-in model: for tokens/s (custom stages: 0)
    bool hierarchical = false;
    int step_ = 0;
    int bad_in_a_row = 0;  // steps not applied since the last applied one

    Impl(std::shared_ptr<Communicator> w, const PipelineOptions& po, const TrainOptions& to)
        : p(po), o(to), plan{po.schedule, po.pp, po.dp, po.ep, po.vpp}, world(std::move(w)), tracer(world->rank(), po.trace) {}

    // The idle share of the schedule: 1 - compute / (the slowest rank's schedule time), averaged over the world.
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

    // Sums the gradients of `bufs` (those `keep` selects) over `group`, in place; returns their squared norm after
    // the sum (0 when none is selected). A group of one sums nothing: the norm is read off the gradients.
    template <typename Keep>
    double sum_gradients(Communicator& group, std::vector<StateBuffer*> const& bufs, Keep keep) {
        std::vector<StateBuffer*> kept;
        size_t total = 0;
        for (StateBuffer* b : bufs)
            if (keep(*b)) {
                kept.push_back(b);
                total += size_t(b->grad.numel());
            }
        if (group.size() > 1 && total > 0) {
            std::vector<T> flat;
            flat.reserve(total);
            for (StateBuffer* b : kept)
                flat.insert(flat.end(), b->grad.template data<T>(), b->grad.template data<T>() + b->grad.numel());
            group.all_reduce(flat.data(), flat.size(), dtype_of<T>())->wait();
            size_t off = 0;
            for (StateBuffer* b : kept) {
                std::memcpy(b->grad.raw(), flat.data() + off, b->grad.nbytes());
                off += size_t(b->grad.numel());
            }
        }
        double sq = 0;
        for (StateBuffer* b : kept) {
            const T* g = b->grad.template data<T>();
            for (int64_t i = 0; i < b->grad.numel(); ++i) sq += double(g[i]) * double(g[i]);
        }
        return sq;
    }

    // The checkpoint pieces of optimizer k of stage s: for each parameter overlapping this rank's ZeRO-1 shard,
    // fn(name, elements, first element of the piece in the parameter, its length, its offset in the shard).
    template <typename Fn>
    void for_each_shard_piece(int s, size_t k, Fn fn) {
        const Zero1AdamW<T>& opt = *optimizers.at(s)[k];
        size_t begin = opt.shard_begin(), end = begin + opt.shard_size(), off = 0;
        for (const auto& [name, n] : optimizer_params.at(s)[k]) {
            size_t lo = std::max(off, begin), hi = std::min(off + n, end);
            if (lo < hi) fn(name, int64_t(n), int64_t(lo - off), int64_t(hi - lo), lo - begin);
            off += n;
        }
    }

    std::vector<StateBuffer> parameters_of(Stage& s) {
        std::vector<StateBuffer> out;
        for (StateBuffer& b : s.state())
            if (b.kind == StateKind::Parameter) {
                if (b.value.dtype() != dtype_of<T>() || b.grad.dtype() != dtype_of<T>() ||
                    b.grad.numel() != b.value.numel() || b.value.device().kind != Device::CPU)
                    throw StageError(fmt::format("{}: parameter '{}' is {} with gradient {}; this trainer runs {} "
                                                 "parameters on the CPU",
                                                 s.name(), b.name, b.value.spec().str(), b.grad.spec().str(),
                                                 dtype_name(dtype_of<T>())));
                out.push_back(std::move(b));
            }
        return out;
    }

    // Rank 0's string on every rank (a collective): its bytes, zeros elsewhere, summed.
    std::string from_rank0(const std::string& mine) {
        int64_t len = world->rank() == 0 ? int64_t(mine.size()) : 0;
        world->all_reduce(&len, 1, DType::I64)->wait();
        if (len == 0) return {};
        std::vector<int64_t> words(size_t(len + 7) / 8, 0);
        if (world->rank() == 0) std::memcpy(words.data(), mine.data(), mine.size());
        world->all_reduce(words.data(), words.size(), DType::I64)->wait();
        return std::string(reinterpret_cast<const char*>(words.data()), size_t(len));
    }

    // Every rank's statistic names and sizes, merged on rank 0 and sent back: the flat layout summed each step.
    void agree_on_statistics(const std::map<std::string, std::vector<double>>& mine) {
        std::string blob;
        for (const auto& [name, v] : mine) blob += fmt::format("{} {}\n", name, v.size());
        std::string merged;
        if (world->rank() == 0) {
            std::map<std::string, size_t> all;
            for (const std::string& b : gather_strings(*world, blob)) {
                size_t pos = 0;
                while (pos < b.size()) {
                    size_t nl = b.find('\n', pos), sp = b.rfind(' ', nl);
                    std::string name = b.substr(pos, sp - pos);
                    size_t n = std::stoul(b.substr(sp + 1, nl - sp - 1));
                    auto [it, fresh] = all.emplace(name, n);
                    if (!fresh && it->second != n)
                        throw StageError(fmt::format("statistic '{}' has {} values on one rank and {} on another", name,
                                                     it->second, n));
                    pos = nl + 1;
                }
            }
            for (const auto& [name, n] : all) merged += fmt::format("{} {}\n", name, n);
        } else {
            gather_strings(*world, blob);
        }
        merged = from_rank0(merged);
        size_t pos = 0;
        while (pos < merged.size()) {
            size_t nl = merged.find('\n', pos), sp = merged.rfind(' ', nl);
            stat_layout.push_back({merged.substr(pos, sp - pos), std::stoul(merged.substr(sp + 1, nl - sp - 1))});
            pos = nl + 1;
        }
    }
};

}  // namespace duplex
