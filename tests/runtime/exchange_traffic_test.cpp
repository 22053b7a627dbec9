// One routing on 2 virtual nodes, the flat and the node-limited path: the bytes the host exchange sends (counted
// by the communicator in math mode), the moves the expert-parallel plan lists for them, what the simulator
// charges (the group's mean of those moves) and what emulate mode charges (its rounds' byte counts) — equal,
// exchange by exchange and link class by link class.
//
// The communicator's counts are the reference: the exchange builds its messages from the routing itself, not
// from the plan. A plan that dropped the second hop's metadata, the gate gradients or a count message, or an
// emulate that charged the gates in the wrong exchange (both did once), fails here.
#include <array>
#include <cmath>
#include <mutex>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "kernels/exchange_plan.hpp"
#include "core/clock.hpp"
#include "runtime/exec/expert_service.hpp"
#include "runtime/model/expert_exchange.hpp"
#include "runtime/sim/emulate.hpp"
#include "runtime/sim/expert_traffic.hpp"

namespace duplex {
namespace {

constexpr int kRanks = 8, kNodes = 2, kTokens = 24, kDim = 16;

ModelConfig model() {
    ModelConfig cfg = ModelConfig::preset("small");  // 16 experts, top-4 of 4 groups, at most 2 groups a token
    cfg.hidden = kDim;
    cfg.seq_len = kTokens;
    cfg.dense_layers = 0;
    return cfg;
}

// Rank r's routing: the model's router on scores from r's own seed.
std::vector<int> routing_of(int rank) {
    ModelConfig cfg = model();
    Rng rng(700 + uint64_t(rank));
    std::vector<double> scores(size_t(kTokens) * cfg.experts);
    for (double& s : scores) s = 1.0 / (1.0 + std::exp(-rng.normal()));
    return route<double>(scores.data(), std::vector<double>(cfg.experts, 0.0), kTokens, cfg).expert;
}

using PerExchange = std::array<LinkBytes, kExchanges>;

// Math mode: the exchange's four calls on every rank, each call's bytes from the communicator's counters.
std::vector<PerExchange> counted(bool node_limited) {
    std::vector<PerExchange> out(kRanks);
    LaunchOptions l{.ranks = kRanks};
    l.virtual_nodes = kNodes;
    l.timeout_s = 60;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        ModelConfig cfg = model();
        std::unique_ptr<ExpertExchange<double>> ex;
        if (node_limited)
            ex = std::make_unique<HierarchicalExchange<double>>(world, cfg.experts);
        else
            ex = std::make_unique<DistributedExchange<double>>(world, cfg.experts);
        Routing r;
        r.tokens = kTokens;
        r.top_k = cfg.top_k;
        r.expert = routing_of(world->rank());
        r.gate.assign(r.expert.size(), 0.25);
        std::vector<double> x(size_t(kTokens) * kDim, 1.0), y(x.size()), dx(x.size(), 0.0);
        PerExchange& mine = out[size_t(world->rank())];
        auto measure = [&](Exchange e, auto&& call) {
            LinkBytes before = world->bytes_sent();
            call();
            LinkBytes after = world->bytes_sent();
            mine[size_t(e)] = {after.intra_node - before.intra_node, after.inter_node - before.inter_node};
        };
        RoutedTokens<double> routed;
        measure(Exchange::Dispatch, [&] { ex->dispatch(x.data(), kDim, r, routed); });
        measure(Exchange::Combine, [&] { ex->combine(routed, routed.rows, kDim, r, y.data()); });
        std::vector<std::vector<double>> d_out;
        std::vector<double> d_gate;
        measure(Exchange::CombineBackward, [&] { ex->combine_backward(routed, y.data(), kDim, r, d_out, d_gate); });
        measure(Exchange::DispatchBackward, [&] { ex->dispatch_backward(routed, d_out, kDim, r, dx.data()); });
    });
    return out;
}

// The executor's services as an emulated stage needs them: the EP group, waits that run the call.
class Services : public StageContext {
public:
    explicit Services(std::shared_ptr<Communicator> group) : experts_(std::move(group)) {}
    void wait(const WorkPtr& work, const std::string&) override { work->wait(); }
    void wait_for(const std::function<void()>& fn, const std::string&) override { fn(); }
    bool in_fb_pair() const override { return false; }
    ExpertService* experts() const override { return &experts_; }
    void compute_begins() override {}

private:
    mutable ExpertService experts_;
};

// Emulate mode on the same routing: per rank, the bytes its forward (dispatch + combine) and its backward
// (combine backward + dispatch backward) charge.
std::vector<std::array<EmulatedBytes, 2>> emulated(bool node_limited) {
    std::vector<std::array<EmulatedBytes, 2>> out(kRanks);
    LaunchOptions l{.ranks = kRanks};
    l.virtual_nodes = kNodes;
    l.timeout_s = 60;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        EmulateOptions o;
        o.model = model();
        o.elem_bytes = sizeof(double);
        o.costs = {1e-6, 2e-6, 1e-6, 3e-6};
        o.hierarchical = node_limited;
        o.routing = [](int, int rank) { return routing_of(rank); };
        StageInfo info;
        info.num_layers = 1;  // layer 0, an MoE layer
        info.rank = world->rank();
        info.ep_rank = world->rank();
        info.ep_size = kRanks;
        auto bytes = std::make_shared<EmulatedBytes>();
        Services services(world);
        Microbatch mb;
        mb.ctx = &services;
        mb.weight_follows = true;
        EmulatedStage stage(o, info, bytes);
        stage.prepare(services);
        stage.forward(mb, TensorView{});
        uint64_t f_intra = bytes->intra, f_inter = bytes->inter;
        stage.backward_input(mb, TensorView{});
        auto& mine = out[size_t(world->rank())];
        mine[0].intra = f_intra;
        mine[0].inter = f_inter;
        mine[1].intra = bytes->intra.load() - f_intra;
        mine[1].inter = bytes->inter.load() - f_inter;
    });
    return out;
}

class ExchangeTraffic_ : public ::testing::TestWithParam<bool> {};

TEST_P(ExchangeTraffic_, PlanSimulatorAndEmulateChargeTheBytesTheCommunicatorCounts) {
    const bool node_limited = GetParam();
    const char* path = node_limited ? "node-limited" : "flat";
    ModelConfig cfg = model();
    Topology topo = Topology::virtual_nodes(kRanks, kNodes);
    ExpertPlacement placement(cfg.experts, kRanks);
    ExpertPath p = choose_path(node_limited, topo);
    ASSERT_EQ(p, node_limited ? ExpertPath::NodeLimited : ExpertPath::Flat);
    std::vector<std::vector<int>> experts;
    std::vector<DispatchPlan> plans;
    for (int r = 0; r < kRanks; ++r) {
        experts.push_back(routing_of(r));
        plans.push_back(plan_dispatch(p, placement.ranks_of(experts.back()), kTokens, cfg.top_k, topo, r));
    }
    const double row = kDim * sizeof(double), value = sizeof(double);
    std::vector<PerExchange> got = counted(node_limited);
    std::array<LinkBytes, kExchanges> total{};
    // The plan, rank by rank.
    for (int r = 0; r < kRanks; ++r) {
        ExchangeTraffic x = exchange_traffic(plans[size_t(r)], arrivals_at(plans, topo, r), topo, r);
        for (int e = 0; e < kExchanges; ++e) {
            TrafficBytes want = traffic_bytes(x.moves[size_t(e)], row, value, topo, r);
            const LinkBytes& c = got[size_t(r)][size_t(e)];
            EXPECT_EQ(double(c.intra_node), want.intra) << path << " rank " << r << " " << exchange_name(Exchange(e));
            EXPECT_EQ(double(c.inter_node), want.inter) << path << " rank " << r << " " << exchange_name(Exchange(e));
            total[size_t(e)].intra_node += c.intra_node;
            total[size_t(e)].inter_node += c.inter_node;
        }
    }
    // The simulator: the group's mean per rank, times the ranks.
    GroupTraffic sim = group_traffic(experts, kTokens, cfg.top_k, placement, topo, p);
    for (int e = 0; e < kExchanges; ++e) {
        TrafficBytes b = sim[size_t(e)].bytes(row, value);
        EXPECT_NEAR(b.intra * kRanks, double(total[size_t(e)].intra_node), 1e-6) << path << " " << exchange_name(Exchange(e));
        EXPECT_NEAR(b.inter * kRanks, double(total[size_t(e)].inter_node), 1e-6) << path << " " << exchange_name(Exchange(e));
    }
    // Emulate mode, rank by rank: forward = dispatch + combine, backward = the two backward exchanges.
    auto em = emulated(node_limited);
    for (int r = 0; r < kRanks; ++r) {
        const PerExchange& c = got[size_t(r)];
        uint64_t f_intra = c[0].intra_node + c[1].intra_node, f_inter = c[0].inter_node + c[1].inter_node;
        uint64_t b_intra = c[2].intra_node + c[3].intra_node, b_inter = c[2].inter_node + c[3].inter_node;
        EXPECT_EQ(em[size_t(r)][0].intra.load(), f_intra) << path << " rank " << r << " forward";
        EXPECT_EQ(em[size_t(r)][0].inter.load(), f_inter) << path << " rank " << r << " forward";
        EXPECT_EQ(em[size_t(r)][1].intra.load(), b_intra) << path << " rank " << r << " backward";
        EXPECT_EQ(em[size_t(r)][1].inter.load(), b_inter) << path << " rank " << r << " backward";
    }
    // Not vacuous: both link classes carry rows, and the node-limited path crosses less.
    EXPECT_GT(total[0].inter_node, 0u);
    EXPECT_GT(total[0].intra_node, 0u);
}

// The device exchange's planner (kernels/exchange_plan.hpp, below the plan's room, so it cannot call it) crosses
// between nodes once per (token, other node it reaches): the node-limited plan's hop-1 rows to relays on other
// nodes, for the same routing.
TEST(ExchangeTraffic, DevicePlannerCrossesNodesAsOftenAsTheNodeLimitedPlan) {
    ModelConfig cfg = model();
    Topology topo = Topology::virtual_nodes(kRanks, kNodes);
    ExpertPlacement placement(cfg.experts, kRanks);
    std::vector<std::vector<uint64_t>> masks(kRanks);
    int64_t crossings = 0;
    for (int r = 0; r < kRanks; ++r) {
        std::vector<int> dest = placement.ranks_of(routing_of(r));
        for (int t = 0; t < kTokens; ++t) {
            uint64_t mask = 0;
            for (int k = 0; k < cfg.top_k; ++k) mask |= uint64_t(1) << dest[size_t(t) * cfg.top_k + k];
            masks[size_t(r)].push_back(mask);
        }
        DispatchPlan d = plan_dispatch(ExpertPath::NodeLimited, dest, kTokens, cfg.top_k, topo, r);
        for (int p = 0; p < kRanks; ++p)
            if (!topo.same_node(p, r)) crossings += d.rows_to_relay[size_t(p)];
    }
    kernels::NodeLimitedPlan device = kernels::plan_node_limited_dispatch(masks, kNodes, 0);
    EXPECT_GT(crossings, 0);
    EXPECT_EQ(device.inter_node_rows, crossings);
}

INSTANTIATE_TEST_SUITE_P(Paths, ExchangeTraffic_, ::testing::Values(false, true),
                         [](const auto& info) { return std::string(info.param ? "NodeLimited" : "Flat"); });

}  // namespace
}  // namespace duplex
