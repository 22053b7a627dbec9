#include "runtime/sim/emulate.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "parallel/plan.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

namespace {
uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
}
}  // namespace

EmulatedStage::EmulatedStage(const EmulateOptions& o, const StageInfo& info, std::shared_ptr<EmulatedBytes> bytes)
    : o_(o), info_(info), bytes_(std::move(bytes)) {
    const ModelConfig& cfg = o.model;
    int first = info.first_layer, n = info.num_layers, tokens = int(cfg.tokens_per_microbatch(o.sequences));
    name_ = n > 0 ? fmt::format("emulated stage {} (layers {}..{})", info.stage, first, first + n - 1)
                  : fmt::format("emulated stage {} (no layers)", info.stage);
    bool given = o.costs.f > 0;
    costs_ = given ? o.costs
                   : o.cost_model.chunk(cfg, first, n, tokens, {false, o.recompute}, info.stage == info.num_stages - 1);
    double total = 0;
    for (int l = first; l < first + n; ++l) total += o.cost_model.forward_flops(cfg, l, tokens);
    for (int l = first; l < first + n; ++l) {
        double attn = given ? 0.5 / n : o.cost_model.attention_flops(cfg, tokens) / total;
        double all = given ? 1.0 / n : o.cost_model.forward_flops(cfg, l, tokens) / total;
        shares_.push_back({l, cfg.is_moe_layer(l), attn, all - attn});
    }
}

// The EP group comes with the calls; the byte counts of sampled real routings are planned once, here.
void EmulatedStage::prepare(StageContext& ctx) {
    ExpertService* ep = ctx.experts();
    group_ = ep ? ep->group() : nullptr;
    const ModelConfig& cfg = o_.model;
    int first = info_.first_layer, n = info_.num_layers, tokens = int(cfg.tokens_per_microbatch(o_.sequences));
    if (group_ && group_->size() > 1) {
        Communicator& group = *group_;
        int sample = std::min(tokens, kSampleTokens);
        token_scale_ = double(tokens) / sample;
        ExpertPlacement placement(cfg.experts, group.size());
        for (int l = first; l < first + n; ++l) {
            if (!cfg.is_moe_layer(l)) continue;
            for (int i = 0; i < kRoutingSamples; ++i) {
                Rng rng(mix(mix(mix(o_.seed, uint64_t(l)), uint64_t(i)), uint64_t(info_.rank)));
                std::vector<double> scores(size_t(sample) * cfg.experts);
                for (double& v : scores) v = 1.0 / (1.0 + std::exp(-rng.normal()));
                Routing r = route<double>(scores.data(), std::vector<double>(cfg.experts, 0.0), sample, cfg);
                routed_[l].push_back(plan_dispatch(r.expert, sample, cfg.top_k, placement, group.topology(), group.rank()));
            }
        }
    }
}

TensorSpec EmulatedStage::input_spec(const Microbatch&) const {
    DType t = o_.elem_bytes == 8 ? DType::F64 : DType::F32;
    return {t, {o_.model.tokens_per_microbatch(o_.sequences), o_.model.hidden}, Device::cpu()};
}

// A compute piece: a timed wait while holding the rank's compute stream (the executor's call holds it). Without
// EP an F&B pair is one modelled overlapped duration, shared by its two halves in proportion.
void EmulatedStage::compute(double seconds, const Microbatch& mb) {
    bool ep = group_ && group_->size() > 1;
    if (!ep && mb.ctx && mb.ctx->in_fb_pair()) seconds *= costs_.fb / std::max(costs_.f + costs_.b, 1e-30);
    if (mb.ctx) mb.ctx->compute_begins();
    sleep_until_seconds(now_seconds() + seconds);
}

std::vector<std::vector<int64_t>> EmulatedStage::round(const Microbatch& mb, uint32_t tag,
                                                       const std::vector<double>& nbytes,
                                                       const std::vector<std::vector<int64_t>>& counts, int width,
                                                       const std::string& name) {
    Communicator& group = *group_;
    const Topology& tp = group.topology();
    const int n = group.size(), me = group.rank();
    std::vector<std::vector<int64_t>> got(n);
    mb.ctx->wait_for(
        [&] {
            double now = now_seconds();
            double total[3] = {0, 0, 0};
            for (int p = 0; p < n; ++p) total[int(tp.link(me, p))] += nbytes[p];
            std::vector<std::vector<int64_t>> out(n, std::vector<int64_t>(width + 1, 0)), in(n);
            std::vector<WorkPtr> works;
            for (int p = 0; p < n; ++p) {
                if (p == me) continue;
                LinkClass link = tp.link(me, p);
                double ready = now + o_.cost_model.ep_transfer_s(total[int(link)], link);
                std::memcpy(&out[p][0], &ready, sizeof(double));
                for (int k = 0; k < width; ++k) out[p][k + 1] = counts.empty() ? 0 : counts[p][k];
                works.push_back(group.isend(out[p].data(), out[p].size() * 8, p, tag));
                in[p].resize(width + 1);
                works.push_back(group.irecv(in[p].data(), in[p].size() * 8, p, tag));
                (link == LinkClass::InterNode ? bytes_->inter : bytes_->intra) += uint64_t(nbytes[p]);
            }
            wait_all(works);
            double latest = now;
            for (int p = 0; p < n; ++p) {
                if (p == me) {
                    got[p] = counts.empty() ? std::vector<int64_t>(width, 0) : counts[p];
                    continue;
                }
                double ready;
                std::memcpy(&ready, &in[p][0], sizeof(double));
                latest = std::max(latest, ready);
                got[p].assign(in[p].begin() + 1, in[p].end());
            }
            sleep_until_seconds(latest);
        },
        name);
    return got;
}

// Unique per (microbatch, layer, exchange, hop) among the rounds in flight on the group (microbatch ids are unique
// across DualPipe's directions; the two stages of a rank hold different layers).
uint32_t EmulatedStage::tag_of(const Microbatch& mb, int layer, int exchange, int hop) const {
    return uint32_t(((mb.id * o_.model.layers + layer) * 4 + exchange) * 2 + hop);
}

void EmulatedStage::dispatch(const Microbatch& mb, int layer) {
    const ModelConfig& cfg = o_.model;
    Communicator& group = *group_;
    const Topology& tp = group.topology();
    const int n = group.size(), me = group.rank();
    const int local = tp.local_size(tp.node(me));
    const double row = double(cfg.hidden) * o_.elem_bytes, elem = o_.elem_bytes;
    bool hierarchical = o_.hierarchical && tp.num_nodes() > 1;
    // One of this rank's sampled routings of the layer, scaled to the microbatch.
    const DispatchPlan& d = routed_.at(layer)[size_t(mb.step + mb.global) % kRoutingSamples];
    auto scaled = [&](int count) { return int64_t(std::llround(count * token_scale_)); };
    EpPlan plan;
    std::string name = fmt::format("dispatch L{} mb {}", layer, mb.id);
    if (!hierarchical) {
        plan.to_expert.resize(n);
        std::vector<double> with_meta(n);
        std::vector<std::vector<int64_t>> counts(n);
        for (int p = 0; p < n; ++p) {
            int64_t slots = scaled(d.slots_to[p]);
            plan.to_expert[p] = double(slots) * row;
            with_meta[p] = double(slots) * (row + 2 * elem);
            counts[p] = {slots};
        }
        auto got = round(mb, tag_of(mb, layer, 0, 0), with_meta, counts, 1, name);
        plan.from_expert.resize(n);
        for (int p = 0; p < n; ++p) plan.from_expert[p] = double(got[p][0]) * row;
    } else {
        // Hop 1: a row per (token, target node) to the relay, (slot, expert, gate) per slot, and the slots per rank
        // of that node for the relay's forwarding.
        std::vector<std::vector<int64_t>> counts(n, std::vector<int64_t>(local + 1, 0));
        plan.to_relay.resize(n), plan.gates.resize(n);
        std::vector<double> first(n);
        for (int p = 0; p < n; ++p) {
            counts[p][0] = scaled(d.rows_to_relay[p]);
            int64_t slots = 0;
            for (int q = 0; q < local; ++q) slots += counts[p][1 + q] = scaled(d.slots_via_relay[p][q]);
            plan.to_relay[p] = double(counts[p][0]) * row;
            first[p] = plan.to_relay[p] + double(slots) * 3 * elem;
        }
        auto from_src = round(mb, tag_of(mb, layer, 0, 0), first, counts, local + 1, name + " (to nodes)");
        // Hop 2 (inside the node): one row per slot to the expert's rank; the relay returns the gate gradients.
        plan.to_expert.assign(n, 0);
        plan.from_relay.assign(n, 0);
        std::vector<std::vector<int64_t>> fwd(n, std::vector<int64_t>(1, 0));
        for (int src = 0; src < n; ++src) {
            plan.from_relay[src] = double(from_src[src][0]) * row;
            int64_t slots = 0;
            for (int q = 0; q < local; ++q) {
                int dest = tp.ranks_on_node(tp.node(me))[q];
                fwd[dest][0] += from_src[src][1 + q];
                slots += from_src[src][1 + q];
            }
            plan.gates[src] = double(slots) * elem;
        }
        for (int q = 0; q < n; ++q) plan.to_expert[q] = double(fwd[q][0]) * row;
        auto got = round(mb, tag_of(mb, layer, 0, 1), plan.to_expert, fwd, 1, name + " (in node)");
        plan.from_expert.resize(n);
        for (int p = 0; p < n; ++p) plan.from_expert[p] = double(got[p][0]) * row;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    plans_[{mb.id, layer}] = std::move(plan);
}

// exchange 1: combine; 2: combine backward; 3: dispatch backward (which drops the plan).
void EmulatedStage::exchange(const Microbatch& mb, int layer, int which) {
    EpPlan plan;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        plan = plans_.at({mb.id, layer});
    }
    const Topology& tp = group_->topology();
    bool hierarchical = o_.hierarchical && tp.num_nodes() > 1;
    const char* what[] = {"", "combine", "combine-bwd", "dispatch-bwd"};
    std::string name = fmt::format("{} L{} mb {}", what[which], layer, mb.id);
    if (!hierarchical) {
        // Combine and dispatch backward go expert -> token, combine backward token -> expert.
        round(mb, tag_of(mb, layer, which, 0), which == 2 ? plan.to_expert : plan.from_expert, {}, 0, name);
    } else if (which == 2) {
        round(mb, tag_of(mb, layer, which, 0), plan.to_relay, {}, 0, name + " (to nodes)");
        round(mb, tag_of(mb, layer, which, 1), plan.to_expert, {}, 0, name + " (in node)");
    } else {
        round(mb, tag_of(mb, layer, which, 0), plan.from_expert, {}, 0, name + " (in node)");
        std::vector<double> back = plan.from_relay;
        if (which == 3)
            for (size_t p = 0; p < back.size(); ++p) back[p] += plan.gates[p];
        round(mb, tag_of(mb, layer, which, 1), back, {}, 0, name + " (to nodes)");
    }
    if (which == 3) {
        std::lock_guard<std::mutex> lock(mutex_);
        plans_.erase({mb.id, layer});
    }
}

Tensor EmulatedStage::forward(const Microbatch& mb, const TensorView&) {
    bool ep = group_ && group_->size() > 1;
    double f = costs_.f;
    if (!ep) {
        compute(f, mb);
    } else {
        for (const LayerShare& l : shares_) {
            if (!l.moe) {
                compute(f * (l.attn + l.ffn), mb);
                continue;
            }
            compute(f * l.attn, mb);
            dispatch(mb, l.layer);
            compute(f * l.ffn, mb);
            exchange(mb, l.layer, 1);
        }
    }
    if (info_.stage == info_.num_stages - 1) return {};
    TensorSpec s = output_spec(mb);
    return Tensor::meta(s.dtype, s.shape, s.device);
}

Tensor EmulatedStage::backward_input(const Microbatch& mb, const TensorView&) {
    bool ep = group_ && group_->size() > 1;
    // B alone is the input-gradient part. A full backward (W follows in the same call) spreads B + W over the
    // layer pieces, as a fused backward computes them, and its backward_weight then costs nothing more.
    double b = mb.weight_follows ? costs_.b : costs_.b - costs_.w;
    if (mb.weight_follows) {
        std::lock_guard<std::mutex> lock(mutex_);
        fused_.insert(mb.id);
    }
    if (!ep) {
        compute(b, mb);
    } else {
        for (auto it = shares_.rbegin(); it != shares_.rend(); ++it) {
            if (!it->moe) {
                compute(b * (it->attn + it->ffn), mb);
                continue;
            }
            exchange(mb, it->layer, 2);
            compute(b * it->ffn, mb);
            exchange(mb, it->layer, 3);
            compute(b * it->attn, mb);
        }
    }
    if (info_.stage == 0) return {};
    TensorSpec s = input_spec(mb);
    return Tensor::meta(s.dtype, s.shape, s.device);
}

void EmulatedStage::backward_weight(const Microbatch& mb) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (fused_.erase(mb.id)) return;
    }
    compute(costs_.w, mb);
}

}  // namespace duplex
