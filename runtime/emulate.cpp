// Emulate mode: the schedule with timed waits for compute and link-delayed transfers of real sizes.
//
// Pipeline transfers carry real-sized buffers whose first 8 bytes hold the send time (the steady clock is shared
// by threads and by processes on one host); the receiver holds the message until send time + latency + bytes /
// bandwidth of its link. Expert exchanges (EP > 1) elide the payload: every round sends each EP peer a small
// header with the time the rank's link would have delivered its real byte count (the rank's total on that link
// class over the link's bandwidth) plus the counts the next hop needs; the receiver waits for the latest.
// Byte counts come from a real routing of the microbatch (node-limited top-K on synthetic affinities), for the
// flat path (one copy per expert) or the hierarchical one (a row per target node, then forwarded per slot).
//
// Compute is a timed wait on the rank's one compute stream. In an F&B pair with EP > 1 the forward and the
// backward chunk run on two threads that take turns on that stream: while one waits for a dispatch or a combine
// the other computes, as DualPipe's overlapped chunk pair does.
#include <cstring>

#include "runtime/pipeline_impl.hpp"

namespace duplex {

namespace {
// A microbatch's split of one stage's compute over its layers: attention and FFN shares of each layer.
struct LayerShare {
    int layer;
    bool moe;
    double attn, ffn;  // fractions of the chunk's compute
};

uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
}
}  // namespace

template <typename T>
StepMetrics PipelineTrainer<T>::emulate_step() {
    Impl& I = *impl_;
    ++I.step_;
    StepMetrics m;
    m.step = I.step_;
    const ModelConfig& cfg = I.cfg;
    int last = I.p.pp - 1, tokens = I.o.sequences_per_microbatch * cfg.seq_len;
    const size_t bytes = std::max<size_t>(I.act_size() * sizeof(T), sizeof(double));
    std::map<int, ChunkCosts> costs;
    std::map<int, std::vector<LayerShare>> shares;
    for (int s : I.emulated_stages) {
        int first = I.stage_first_layer(s), n = I.stage_num_layers(s);
        bool given = I.p.emulate_costs.f > 0;
        costs[s] = given ? I.p.emulate_costs
                         : I.p.cost_model.chunk(cfg, first, n, tokens, {false, I.o.recompute}, s == last);
        double total = 0;
        shares[s] = {};  // a stage may hold no layers when emulating more stages than the model has layers
        for (int l = first; l < first + n; ++l) total += I.p.cost_model.forward_flops(cfg, l, tokens);
        for (int l = first; l < first + n; ++l) {
            double attn = given ? 0.5 / n : I.p.cost_model.attention_flops(cfg, tokens) / total;
            double all = given ? 1.0 / n : I.p.cost_model.forward_flops(cfg, l, tokens) / total;
            shares[s].push_back({l, cfg.is_moe_layer(l), attn, all - attn});
        }
    }
    const bool ep = I.p.ep > 1;
    std::mutex mu;  // compute_us and the pending sends, shared by the two halves of an F&B pair
    double compute_us = 0;

    // One compute piece on the rank's compute stream.
    auto compute = [&](double seconds, const std::string& name) {
        std::unique_lock<std::mutex> stream(I.gpu, std::defer_lock);
        if (ep) stream.lock();
        double t0 = I.tracer.now_us();
        sleep_until_seconds(steady_seconds() + seconds);
        double t1 = I.tracer.now_us();
        I.note(I.compute_iv, t0, t1);
        I.tracer.add(Lane::Compute, name, t0, t1);
        std::lock_guard<std::mutex> lock(mu);
        compute_us += t1 - t0;
    };

    std::vector<std::pair<WorkPtr, std::shared_ptr<std::vector<char>>>> pending;
    auto recv = [&](const Chunk& producer, bool gradient) {
        int from = I.schedule.rank_of(producer.stage, producer.dir);
        if (from == I.prank) return;
        std::vector<char> buf(bytes);
        double t0 = I.tracer.now_us();
        I.pipe->irecv(buf.data(), bytes, from, sched::p2p_tag(I.schedule, producer, gradient))->wait();
        double sent;
        std::memcpy(&sent, buf.data(), sizeof(double));
        LinkClass link = I.pipe->topology().link(from, I.prank);
        sleep_until_seconds(sent + I.p.cost_model.transfer_s(double(bytes), link));
        double t1 = I.tracer.now_us();
        I.tracer.add(Lane::Comm, fmt::format("recv {} mb {}", gradient ? "grad" : "act", producer.mb), t0, t1);
        I.note(I.comm_iv, t0, t1);
    };
    auto send = [&](const Chunk& producer, bool gradient, int to_stage) {
        int to = I.schedule.rank_of(to_stage, producer.dir);
        if (to == I.prank) return;
        auto buf = std::make_shared<std::vector<char>>(bytes, 0);
        double now = steady_seconds();
        std::memcpy(buf->data(), &now, sizeof(double));
        auto w = I.pipe->isend(buf->data(), bytes, to, sched::p2p_tag(I.schedule, producer, gradient));
        std::lock_guard<std::mutex> lock(mu);
        pending.push_back({w, buf});
    };

    // ---- expert exchanges ----
    Communicator* group = ep ? I.groups.ep.get() : nullptr;
    const int n = group ? group->size() : 1, me = group ? group->rank() : 0;
    const Topology* tp = group ? &group->topology() : nullptr;
    const int local = tp ? tp->local_size(tp->node(me)) : 1;
    const double row = double(cfg.hidden) * sizeof(T), elem = sizeof(T);
    const int per_rank = cfg.experts / std::max(I.p.ep, 1);

    // One round: a header to every other peer (delivery time, then `width` counts), the peers' headers back,
    // then a wait until the latest delivery. Returns the counts each peer sent (own counts for itself).
    auto round = [&](uint32_t tag, const std::vector<double>& nbytes, const std::vector<std::vector<int64_t>>& counts,
                     int width, const std::string& name, bool in_fb) {
        double t0 = I.tracer.now_us(), now = steady_seconds();
        double total[3] = {0, 0, 0};
        for (int p = 0; p < n; ++p) total[int(tp->link(me, p))] += nbytes[p];
        std::vector<std::vector<int64_t>> out(n, std::vector<int64_t>(width + 1, 0)), in(n);
        std::vector<WorkPtr> works;
        for (int p = 0; p < n; ++p) {
            if (p == me) continue;
            LinkClass link = tp->link(me, p);
            double ready = now + I.p.cost_model.ep_transfer_s(total[int(link)], link);
            std::memcpy(&out[p][0], &ready, sizeof(double));
            for (int k = 0; k < width; ++k) out[p][k + 1] = counts.empty() ? 0 : counts[p][k];
            works.push_back(group->isend(out[p].data(), out[p].size() * 8, p, tag));
            in[p].resize(width + 1);
            works.push_back(group->irecv(in[p].data(), in[p].size() * 8, p, tag));
            std::lock_guard<std::mutex> lock(mu);
            (link == LinkClass::InterNode ? I.emulated_ep_bytes.inter_node : I.emulated_ep_bytes.intra_node) +=
                uint64_t(nbytes[p]);
        }
        wait_all(works);
        double latest = now;
        std::vector<std::vector<int64_t>> got(n);
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
        double t1 = I.tracer.now_us();
        I.tracer.add(Lane::Comm, in_fb ? name + " [F&B]" : name, t0, t1);  // the mark lets a trace reader find them
        I.note(I.comm_iv, t0, t1);
        if (in_fb) I.note(I.fb_ep_iv, t0, t1);
        return got;
    };
    // Tags: unique per (direction, microbatch, layer, exchange, hop) among the rounds in flight on a group.
    auto tag_of = [&](const Chunk& c, int layer, int exchange, int hop) {
        return uint32_t((((c.dir * I.o.microbatches + c.mb) * cfg.layers + layer) * 4 + exchange) * 2 + hop);
    };
    auto relay_of = [&](int expert) { return tp->ranks_on_node(tp->node(expert / per_rank))[tp->local_rank(me)]; };

    // Dispatch: routes the microbatch's tokens for this layer and runs the rounds; keeps the byte plan.
    auto dispatch = [&](const Chunk& c, int layer, bool in_fb) {
        Rng rng(mix(mix(mix(mix(I.o.seed, uint64_t(I.step_)), uint64_t(I.global_mb(c.mb))), uint64_t(c.dir)),
                    uint64_t(layer)));
        std::vector<double> scores(size_t(tokens) * cfg.experts);
        for (double& v : scores) v = 1.0 / (1.0 + std::exp(-rng.normal()));
        Routing r = route<double>(scores.data(), std::vector<double>(cfg.experts, 0.0), tokens, cfg);
        typename Impl::EpPlan plan;
        std::string name = fmt::format("dispatch L{} mb {}", layer, c.mb);
        if (!I.hierarchical) {
            std::vector<double> slots(n, 0);
            for (int e : r.expert) slots[e / per_rank] += 1;
            plan.to_expert.resize(n);
            for (int p = 0; p < n; ++p) plan.to_expert[p] = slots[p] * row;
            std::vector<double> with_meta(n);
            std::vector<std::vector<int64_t>> counts(n);
            for (int p = 0; p < n; ++p) {
                with_meta[p] = slots[p] * (row + 2 * elem);
                counts[p] = {int64_t(slots[p])};
            }
            auto got = round(tag_of(c, layer, 0, 0), with_meta, counts, 1, name, in_fb);
            plan.from_expert.resize(n);
            for (int p = 0; p < n; ++p) plan.from_expert[p] = double(got[p][0]) * row;
        } else {
            // Hop 1: a row per (token, target node) to the relay, (slot, expert, gate) per slot, and the slots per
            // rank of that node for the relay's forwarding.
            std::vector<std::vector<int64_t>> counts(n, std::vector<int64_t>(local + 1, 0));
            std::vector<double> slots_to(n, 0);
            for (int t = 0; t < tokens; ++t) {
                std::vector<int> relays;
                for (int k = 0; k < cfg.top_k; ++k) {
                    int e = r.expert[size_t(t) * cfg.top_k + k], p = relay_of(e);
                    if (std::find(relays.begin(), relays.end(), p) == relays.end()) relays.push_back(p), ++counts[p][0];
                    ++counts[p][1 + tp->local_rank(e / per_rank)];
                    slots_to[p] += 1;
                }
            }
            plan.to_relay.resize(n), plan.meta.resize(n), plan.gates.resize(n);
            std::vector<double> first(n);
            for (int p = 0; p < n; ++p) {
                plan.to_relay[p] = double(counts[p][0]) * row;
                first[p] = plan.to_relay[p] + slots_to[p] * 3 * elem;
            }
            auto from_src = round(tag_of(c, layer, 0, 0), first, counts, local + 1, name + " (to nodes)", in_fb);
            // Hop 2 (inside the node): one row per slot to the expert's rank; the relay returns the gate gradients.
            plan.to_expert.assign(n, 0);
            plan.from_relay.assign(n, 0);
            std::vector<std::vector<int64_t>> fwd(n, std::vector<int64_t>(1, 0));
            for (int src = 0; src < n; ++src) {
                plan.from_relay[src] = double(from_src[src][0]) * row;
                int64_t slots = 0;
                for (int q = 0; q < local; ++q) {
                    int dest = tp->ranks_on_node(tp->node(me))[q];
                    fwd[dest][0] += from_src[src][1 + q];
                    slots += from_src[src][1 + q];
                }
                plan.gates[src] = double(slots) * elem;
            }
            for (int q = 0; q < n; ++q) plan.to_expert[q] = double(fwd[q][0]) * row;
            auto got = round(tag_of(c, layer, 0, 1), plan.to_expert, fwd, 1, name + " (in node)", in_fb);
            plan.from_expert.resize(n);
            for (int p = 0; p < n; ++p) plan.from_expert[p] = double(got[p][0]) * row;
        }
        std::lock_guard<std::mutex> lock(mu);
        I.ep_plans[{c.dir, c.mb, layer}] = std::move(plan);
    };
    auto plan_of = [&](const Chunk& c, int layer) {
        std::lock_guard<std::mutex> lock(mu);
        return I.ep_plans.at({c.dir, c.mb, layer});
    };
    // exchange 1: combine; 2: combine backward; 3: dispatch backward (which drops the plan).
    auto exchange = [&](const Chunk& c, int layer, int which, bool in_fb) {
        auto plan = plan_of(c, layer);
        const char* what[] = {"", "combine", "combine-bwd", "dispatch-bwd"};
        std::string name = fmt::format("{} L{} mb {}", what[which], layer, c.mb);
        if (!I.hierarchical) {
            // Combine and dispatch backward go expert -> token, combine backward token -> expert.
            round(tag_of(c, layer, which, 0), which == 2 ? plan.to_expert : plan.from_expert, {}, 0, name, in_fb);
        } else if (which == 2) {
            round(tag_of(c, layer, which, 0), plan.to_relay, {}, 0, name + " (to nodes)", in_fb);
            round(tag_of(c, layer, which, 1), plan.to_expert, {}, 0, name + " (in node)", in_fb);
        } else {
            round(tag_of(c, layer, which, 0), plan.from_expert, {}, 0, name + " (in node)", in_fb);
            std::vector<double> back = plan.from_relay;
            if (which == 3)
                for (int p = 0; p < n; ++p) back[p] += plan.gates[p];
            round(tag_of(c, layer, which, 1), back, {}, 0, name + " (to nodes)", in_fb);
        }
        if (which == 3) {
            std::lock_guard<std::mutex> lock(mu);
            I.ep_plans.erase({c.dir, c.mb, layer});
        }
    };

    auto forward = [&](const Chunk& c, bool in_fb) {
        if (c.stage > 0) recv({c.mb, c.stage - 1, c.dir}, false);
        double f = costs.at(c.stage).f;
        if (!ep) {
            compute(f, fmt::format("F mb {} stage {}", c.mb, c.stage));
        } else {
            for (const LayerShare& l : shares.at(c.stage)) {
                if (!l.moe) {
                    compute(f * (l.attn + l.ffn), fmt::format("F L{} mb {}", l.layer, c.mb));
                    continue;
                }
                compute(f * l.attn, fmt::format("F attn L{} mb {}", l.layer, c.mb));
                dispatch(c, l.layer, in_fb);
                compute(f * l.ffn, fmt::format("F experts L{} mb {}", l.layer, c.mb));
                exchange(c, l.layer, 1, in_fb);
            }
        }
        if (c.stage < last) send(c, false, c.stage + 1);
    };
    auto backward = [&](const Chunk& c, bool with_weight, bool in_fb) {
        if (c.stage < last) recv({c.mb, c.stage + 1, c.dir}, true);
        const ChunkCosts& cc = costs.at(c.stage);
        double b = with_weight ? cc.b : cc.b - cc.w;
        const char* op = with_weight ? "BW" : "B";
        if (!ep) {
            compute(b, fmt::format("{} mb {} stage {}", op, c.mb, c.stage));
        } else {
            const auto& ls = shares.at(c.stage);
            for (auto it = ls.rbegin(); it != ls.rend(); ++it) {
                if (!it->moe) {
                    compute(b * (it->attn + it->ffn), fmt::format("{} L{} mb {}", op, it->layer, c.mb));
                    continue;
                }
                exchange(c, it->layer, 2, in_fb);
                compute(b * it->ffn, fmt::format("{} experts L{} mb {}", op, it->layer, c.mb));
                exchange(c, it->layer, 3, in_fb);
                compute(b * it->attn, fmt::format("{} attn L{} mb {}", op, it->layer, c.mb));
            }
        }
        if (c.stage > 0) send(c, true, c.stage - 1);
    };

    double start = I.tracer.now_us();
    for (const Instr& in : I.schedule.ranks[I.prank]) {
        switch (in.op) {
            case Op::F: forward(in.f, false); break;
            case Op::B: backward(in.b, false, false); break;
            case Op::BW: backward(in.b, true, false); break;
            case Op::W: compute(costs.at(in.b.stage).w, fmt::format("W mb {} stage {}", in.b.mb, in.b.stage)); break;
            case Op::FB:
                if (!ep) {
                    // One modelled F&B pair: the cost model's (or the user's) overlapped duration.
                    if (in.f.stage > 0) recv({in.f.mb, in.f.stage - 1, in.f.dir}, false);
                    if (in.b.stage < last) recv({in.b.mb, in.b.stage + 1, in.b.dir}, true);
                    compute(costs.at(in.f.stage).fb, fmt::format("FB mb {}/{}", in.f.mb, in.b.mb));
                    if (in.f.stage < last) send(in.f, false, in.f.stage + 1);
                    if (in.b.stage > 0) send(in.b, true, in.b.stage - 1);
                } else {
                    // The forward on a helper thread, the backward here: they take turns on the compute stream,
                    // so one computes while the other waits for its dispatch or combine.
                    std::exception_ptr failed;
                    std::thread helper([&] {
                        try {
                            forward(in.f, true);
                        } catch (...) {
                            failed = std::current_exception();
                        }
                    });
                    try {
                        backward(in.b, true, true);
                    } catch (...) {
                        helper.join();
                        throw;
                    }
                    helper.join();
                    if (failed) std::rethrow_exception(failed);
                }
                break;
        }
    }
    for (auto& [w, buf] : pending) w->wait();
    double schedule_us = I.tracer.now_us() - start;
    // The step ends when the slowest rank ends: its time and the mean idle share, over the world.
    double slowest = 0;
    m.bubble_fraction = I.bubble_share(schedule_us, compute_us, slowest);
    I.hidden_shares(m);
    m.step_time_s = slowest * 1e-6;
    m.tokens_per_s = double(I.o.microbatches) * I.p.dp * tokens / std::max(m.step_time_s, 1e-9);
    return m;
}

template StepMetrics PipelineTrainer<float>::emulate_step();
template StepMetrics PipelineTrainer<double>::emulate_step();

}  // namespace duplex
