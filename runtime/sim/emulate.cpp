#include "runtime/sim/emulate.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "parallel/expert_plan.hpp"
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
    if (group_ && group_->size() > 1) sample_routings(*group_);
}

void EmulatedStage::sample_routings(const Communicator& group) {
    const ModelConfig& cfg = o_.model;
    const int tokens = int(cfg.tokens_per_microbatch(o_.sequences));
    const int sample = o_.routing ? tokens : std::min(tokens, kSampleTokens);
    const double scale = double(tokens) / sample;
    path_ = choose_path(o_.hierarchical, group.topology());
    ExpertPlacement placement(cfg.experts, group.size());
    auto scaled = [&](int64_t& count) { count = int64_t(std::llround(double(count) * scale)); };
    for (int l = info_.first_layer; l < info_.first_layer + info_.num_layers; ++l) {
        if (!cfg.is_moe_layer(l)) continue;
        for (int i = 0; i < (o_.routing ? 1 : kRoutingSamples); ++i) {
            std::vector<int> experts;
            if (o_.routing) {
                experts = o_.routing(l, info_.rank);
                DUPLEX_CHECK_ARG(int64_t(experts.size()) == int64_t(tokens) * cfg.top_k, "emulate routing",
                                 "layer {}: {} slots for {} tokens x top-{}", l, experts.size(), tokens, cfg.top_k);
            } else {
                Rng rng(mix(mix(mix(o_.seed, uint64_t(l)), uint64_t(i)), uint64_t(info_.rank)));
                std::vector<double> scores(size_t(sample) * cfg.experts);
                for (double& v : scores) v = 1.0 / (1.0 + std::exp(-rng.normal()));
                experts = route<double>(scores.data(), std::vector<double>(cfg.experts, 0.0), sample, cfg).expert;
            }
            DispatchPlan d = plan_dispatch(path_, placement.ranks_of(experts), sample, cfg.top_k, group.topology(),
                                           group.rank());
            for (int64_t& c : d.slots_to) scaled(c);
            for (int64_t& c : d.rows_to_relay) scaled(c);
            for (auto& per_local : d.slots_via_relay)
                for (int64_t& c : per_local) scaled(c);
            routed_[l].push_back(std::move(d));
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

// Unique per (microbatch, layer, exchange, round) among the rounds in flight on the group (microbatch ids are
// unique across DualPipe's directions; the two stages of a rank hold different layers).
uint32_t EmulatedStage::tag_of(const Microbatch& mb, int layer, Exchange exchange, int round) const {
    return uint32_t(((mb.id * o_.model.layers + layer) * kExchanges + int(exchange)) * 4 + round);
}

std::vector<std::vector<int64_t>> EmulatedStage::hop_round(const Microbatch& mb, int layer, Exchange which,
                                                           const std::vector<TrafficMove>& moves, int hop,
                                                           int round_index,
                                                           const std::vector<std::vector<int64_t>>& counts, int width) {
    const int n = group_->size(), me = group_->rank();
    const double elem = o_.elem_bytes, row = double(o_.model.hidden) * elem;
    std::vector<double> nbytes = peer_bytes(moves, row, elem, me, hop);  // metadata travels in the rows' type
    nbytes.resize(size_t(n), 0.0);
    std::string name = fmt::format("{} L{} mb {}", exchange_name(which), layer, mb.id);
    if (path_ == ExpertPath::NodeLimited) name += hop == 0 ? " (to nodes)" : " (in node)";
    return round(mb, tag_of(mb, layer, which, round_index), nbytes, counts, width, name);
}

// The dispatch's rounds also carry what the next hop and the later exchanges need: the counts each peer's plan
// sends here (Arrivals). With them, the moves of all four exchanges are known and kept until dispatch backward.
void EmulatedStage::dispatch(const Microbatch& mb, int layer) {
    const Topology& tp = group_->topology();
    const int n = group_->size(), me = group_->rank();
    // One of this rank's sampled routings of the layer, scaled to the microbatch.
    const std::vector<DispatchPlan>& samples = routed_.at(layer);
    const DispatchPlan& d = samples[size_t(mb.step + mb.global) % samples.size()];
    Arrivals got;
    got.slots_from.assign(size_t(n), 0);
    const std::vector<TrafficMove> first = exchange_traffic(d, got, tp, me).of(Exchange::Dispatch);
    if (path_ == ExpertPath::Flat) {
        std::vector<std::vector<int64_t>> counts(n);
        for (int p = 0; p < n; ++p) counts[p] = {d.slots_to[size_t(p)]};
        auto in = hop_round(mb, layer, Exchange::Dispatch, first, 0, 0, counts, 1);
        for (int p = 0; p < n; ++p) got.slots_from[size_t(p)] = in[size_t(p)][0];
    } else {
        // Hop 1: the relays learn their rows and the slots they forward per rank of their node.
        const int local = tp.local_size(tp.node(me));
        std::vector<std::vector<int64_t>> counts(n);
        for (int p = 0; p < n; ++p) {
            counts[p] = {d.rows_to_relay[size_t(p)]};
            counts[p].insert(counts[p].end(), d.slots_via_relay[size_t(p)].begin(), d.slots_via_relay[size_t(p)].end());
        }
        auto in = hop_round(mb, layer, Exchange::Dispatch, first, 0, 0, counts, local + 1);
        got.rows_from.assign(size_t(n), 0);
        got.slots_via_me.assign(size_t(n), {});
        for (int p = 0; p < n; ++p) {
            got.rows_from[size_t(p)] = in[size_t(p)][0];
            got.slots_via_me[size_t(p)].assign(in[size_t(p)].begin() + 1, in[size_t(p)].end());
        }
        // Hop 2: the expert ranks learn what each relay of their node forwards.
        const std::vector<TrafficMove> second = exchange_traffic(d, got, tp, me).of(Exchange::Dispatch);
        std::vector<std::vector<int64_t>> forward(n);
        for (int q = 0; q < n; ++q) forward[q] = {second.back().rows[size_t(q)]};
        auto in2 = hop_round(mb, layer, Exchange::Dispatch, second, 1, 1, forward, 1);
        got.forwarded_from.assign(size_t(n), 0);
        for (int r = 0; r < n; ++r) got.forwarded_from[size_t(r)] = in2[size_t(r)][0];
    }
    std::lock_guard<std::mutex> lock(mutex_);
    plans_[{mb.id, layer}] = exchange_traffic(d, got, tp, me);
}

// Combine, combine backward, dispatch backward (which drops the plan): a round per run of moves of one hop.
void EmulatedStage::exchange(const Microbatch& mb, int layer, Exchange which) {
    ExchangeTraffic x;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        x = plans_.at({mb.id, layer});
    }
    const std::vector<TrafficMove>& moves = x.of(which);
    int round_index = 0;
    for (size_t i = 0; i < moves.size();) {
        size_t j = i;
        while (j < moves.size() && moves[j].hop == moves[i].hop) ++j;
        std::vector<TrafficMove> run(moves.begin() + long(i), moves.begin() + long(j));
        hop_round(mb, layer, which, run, moves[i].hop, round_index++, {}, 0);
        i = j;
    }
    if (which == Exchange::DispatchBackward) {
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
            exchange(mb, l.layer, Exchange::Combine);
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
            exchange(mb, it->layer, Exchange::CombineBackward);
            compute(b * it->ffn, mb);
            exchange(mb, it->layer, Exchange::DispatchBackward);
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
