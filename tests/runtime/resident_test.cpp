// The expert-major path, where a dispatch's rows stay where the exchange puts them (the GPU, on the executor's device
// path) from the exchange through the expert MLPs and back: here on the host, with a transport that places rows by
// kernels::plan_expert_major and an expert compute that reads them there. Against the host path: the plan
// (placements), the exchange's four resident calls and the stage's plumbing, each of which a GPU run relies on.
#include <cmath>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/clock.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/exchange_plan.hpp"
#include "runtime/train/data.hpp"
#include "runtime/model/expert_exchange.hpp"
#include "runtime/model/stage.hpp"
#include "tests/runtime/p2p_transport.hpp"

namespace duplex {
namespace {

// Host rows that own their storage.
template <typename T>
struct HostRows : ResidentRows {
    std::vector<T> values;
    static std::shared_ptr<HostRows> make(std::vector<int64_t> first, int width) {
        auto r = std::make_shared<HostRows>();
        r->first = std::move(first);
        r->width = width;
        r->values.assign(size_t(r->first.back()) * width, T(0));
        r->data = r->values.data();
        return r;
    }
    T* row(int64_t i) { return values.data() + size_t(i) * width; }
};

template <typename T>
const T* row_of(const ResidentRows& r, int64_t i) {
    return static_cast<const T*>(r.data) + size_t(i) * r.width;
}

// Moves rows with the communicator's point-to-point calls; the expert-major calls place them by the plan.
template <typename T>
class HostResidentTransport : public test_support::PointToPointTransport<T> {
public:
    using test_support::PointToPointTransport<T>::PointToPointTransport;
    using test_support::PointToPointTransport<T>::exchange;

    int rows_stay_on() const override { return -1; }

    std::shared_ptr<ResidentRows> exchange_to_experts(const std::vector<std::vector<T>>& per_peer,
                                                      const std::vector<std::vector<int64_t>>& sent, int width) override {
        ++to_experts;
        kernels::ExpertMajorPlan plan = plan_of(sent);
        int me = this->comm_->rank();
        auto arrived = exchange(per_peer, width);  // source-major blocks, each grouped by local expert
        auto out = HostRows<T>::make(plan.expert_first[me], width);
        std::vector<int64_t> block_start = first_token_rows(plan, me);
        for (const kernels::RowMove& m : plan.moves) {
            if (m.expert != me) continue;
            const T* from = arrived[m.token].data() + size_t(m.token_row - block_start[m.token]) * width;
            std::memcpy(out->row(m.expert_row), from, sizeof(T) * size_t(m.rows) * width);
        }
        return out;
    }

    std::vector<std::vector<T>> exchange_from_experts(const ResidentRows& rows, const std::vector<std::vector<int64_t>>& sent,
                                                      int width) override {
        ++from_experts;
        kernels::ExpertMajorPlan plan = plan_of(sent);
        int n = this->comm_->size(), me = this->comm_->rank();
        EXPECT_EQ(rows.first, plan.expert_first[me]);
        std::vector<std::vector<T>> back(n);
        for (const kernels::RowMove& m : plan.moves)  // in each token rank's order
            if (m.expert == me)
                back[m.token].insert(back[m.token].end(), row_of<T>(rows, m.expert_row),
                                     row_of<T>(rows, m.expert_row + m.rows));
        return exchange(back, width);
    }

    int to_experts = 0, from_experts = 0;

private:
    kernels::ExpertMajorPlan plan_of(const std::vector<std::vector<int64_t>>& sent) {
        Communicator& comm = *this->comm_;
        int n = comm.size(), E = int(sent.at(0).size());
        std::vector<int64_t> mine, all(size_t(n) * n * E);
        for (const auto& per_expert : sent) mine.insert(mine.end(), per_expert.begin(), per_expert.end());
        comm.all_gather(mine.data(), all.data(), mine.size() * sizeof(int64_t))->wait();
        std::vector<std::vector<std::vector<int64_t>>> c(n, std::vector<std::vector<int64_t>>(n));
        for (int q = 0; q < n; ++q)
            for (int s = 0; s < n; ++s) c[q][s].assign(all.begin() + long((size_t(q) * n + s) * E), all.begin() + long((size_t(q) * n + s + 1) * E));
        return kernels::plan_expert_major(c);
    }
    // Per token rank q: the row of q's buffer where its block for `expert_rank` starts.
    static std::vector<int64_t> first_token_rows(const kernels::ExpertMajorPlan& plan, int expert_rank) {
        std::vector<int64_t> start(plan.token_rows.size(), -1);
        for (const kernels::RowMove& m : plan.moves)
            if (m.expert == expert_rank && start[m.token] < 0) start[m.token] = m.token_row;
        return start;
    }
};

TEST(ExpertMajorPlan, PlacesEveryRowExpertMajorAndRefusesBadCounts) {
    // 2 ranks, 2 local experts each: sent[q][s][e].
    std::vector<std::vector<std::vector<int64_t>>> sent = {{{1, 0}, {2, 3}}, {{4, 5}, {0, 6}}};
    kernels::ExpertMajorPlan p = kernels::plan_expert_major(sent);
    EXPECT_EQ(p.token_rows, (std::vector<int64_t>{6, 15}));
    EXPECT_EQ(p.expert_first[0], (std::vector<int64_t>{0, 5, 10}));  // expert 0: 1 from rank 0, 4 from rank 1
    EXPECT_EQ(p.expert_first[1], (std::vector<int64_t>{0, 2, 11}));
    // Rank 1's rows for rank 0's expert 1 (5 rows, its 5th..9th) follow nobody's: expert 1 of rank 0 starts at 5.
    bool found = false;
    for (const kernels::RowMove& m : p.moves)
        if (m.token == 1 && m.expert == 0 && m.rows == 5) {
            EXPECT_EQ(m.token_row, 4);
            EXPECT_EQ(m.expert_row, 5);
            found = true;
        }
    EXPECT_TRUE(found);
    // Rank 1's 6 rows for rank 1's expert 1 come after rank 0's 3.
    for (const kernels::RowMove& m : p.moves)
        if (m.token == 1 && m.expert == 1) {
            EXPECT_EQ(m.expert_row, 2 + 3);
        }
    sent[1][0][1] = -1;
    EXPECT_THROW(kernels::plan_expert_major(sent), ConfigError);
    sent[1][0].pop_back();
    EXPECT_THROW(kernels::plan_expert_major(sent), ConfigError);
}

constexpr int kTokens = 40, kDim = 24;

// The four exchanges with stand-in experts (row * (expert + 1)) on the rows where they landed, against the same on
// LocalExchange.
TEST(ExpertMajorPath, ExchangesWithRowsWhereTheyLandEqualTheLocalExchange) {
    LaunchOptions l;
    l.ranks = 4;
    l.timeout_s = 60;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        ModelConfig cfg = ModelConfig::preset("small");
        Rng rng(100 + uint64_t(world->rank()));
        std::vector<double> x(size_t(kTokens) * kDim), dy(x.size()), scores(size_t(kTokens) * cfg.experts);
        for (double& v : x) v = rng.normal();
        for (double& v : dy) v = rng.normal();
        for (double& s : scores) s = 1.0 / (1.0 + std::exp(-rng.normal()));
        Routing r = route<double>(scores.data(), std::vector<double>(cfg.experts, 0.0), kTokens, cfg);

        LocalExchange<double> local(cfg.experts);
        RoutedTokens<double> lr;
        local.dispatch(x.data(), kDim, r, lr);
        std::vector<std::vector<double>> lout(cfg.experts), ld_rows(cfg.experts), ld_out;
        for (int e = 0; e < cfg.experts; ++e) {
            lout[e] = lr.rows[e];
            for (double& v : lout[e]) v *= e + 1;
        }
        std::vector<double> want_y(x.size()), want_dx(x.size(), 0.0), want_dgate;
        local.combine(lr, lout, kDim, r, want_y.data());
        local.combine_backward(lr, dy.data(), kDim, r, ld_out, want_dgate);
        for (int e = 0; e < cfg.experts; ++e) {
            ld_rows[e] = ld_out[e];
            for (double& v : ld_rows[e]) v *= e + 1;
        }
        local.dispatch_backward(lr, ld_rows, kDim, r, want_dx.data());

        DistributedExchange<double> ex(world, cfg.experts);
        auto transport = std::make_shared<HostResidentTransport<double>>(world->split(0, world->rank()));
        ex.set_transport(transport);
        ASSERT_EQ(ex.rows_stay_on(), -1);
        RoutedTokens<double> routed;
        routed.keep_rows = true;
        ex.dispatch(x.data(), kDim, r, routed);
        ASSERT_TRUE(routed.resident);
        for (const auto& rows : routed.rows) EXPECT_TRUE(rows.empty());
        auto scaled = [&](const ResidentRows& in) {
            auto out = HostRows<double>::make(in.first, kDim);
            for (int e = 0; e < ex.num_local_experts(); ++e)
                for (int64_t i = in.first[e]; i < in.first[e + 1]; ++i)
                    for (int c = 0; c < kDim; ++c) out->row(i)[c] = row_of<double>(in, i)[c] * (ex.first_local_expert() + e + 1);
            return out;
        };
        std::vector<double> y(x.size()), dx(x.size(), 0.0), d_gate;
        ex.combine_resident(routed, *scaled(*routed.resident), kDim, r, y.data());
        std::shared_ptr<ResidentRows> d_out;
        ex.combine_backward_resident(routed, dy.data(), kDim, r, d_out, d_gate);
        ASSERT_TRUE(d_out);
        ex.dispatch_backward_resident(routed, *scaled(*d_out), kDim, r, dx.data());
        for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], want_y[i], 1e-12 * (1 + std::fabs(want_y[i]))) << i;
        for (size_t i = 0; i < dx.size(); ++i) ASSERT_NEAR(dx[i], want_dx[i], 1e-12 * (1 + std::fabs(want_dx[i]))) << i;
        ASSERT_EQ(d_gate.size(), want_dgate.size());
        for (size_t i = 0; i < d_gate.size(); ++i) ASSERT_NEAR(d_gate[i], want_dgate[i], 1e-12 * (1 + std::fabs(want_dgate[i])));
        EXPECT_EQ(transport->to_experts, 2);
        EXPECT_EQ(transport->from_experts, 2);
    });
}

// The routed experts' SwiGLU MLP on the host as an ExpertCompute; with `resident`, it also reads rows where the
// exchange left them (host memory here).
template <typename T>
class HostExperts : public ExpertCompute<T> {
public:
    explicit HostExperts(bool resident) : resident_(resident) {}
    std::string name() const override { return "host"; }
    bool reads_rows_on(int where) const override { return resident_ && where == -1; }

    void forward(uint64_t key, const typename ExpertCompute<T>::Weights& w, const std::vector<std::vector<T>>& rows,
                 std::vector<std::vector<T>>& out) override {
        Stash st;
        int E = int(w.w1.size());
        out.assign(E, {});
        for (int e = 0; e < E; ++e) {
            int d = int(w.w1[e]->shape[0]), f = int(w.w1[e]->shape[1]), r = int(rows[e].size() / d);
            st.x.push_back(rows[e]);
            std::vector<T> a1(size_t(r) * f), a3(a1.size()), s(a1.size());
            out[e].assign(size_t(r) * d, T(0));
            if (r) {
                kernels::gemm<T>(false, false, r, f, d, 1, rows[e].data(), w.w1[e]->value.data(), 0, a1.data());
                kernels::gemm<T>(false, false, r, f, d, 1, rows[e].data(), w.w3[e]->value.data(), 0, a3.data());
                kernels::swiglu_forward<T>(a1.data(), a3.data(), a1.size(), s.data());
                kernels::gemm<T>(false, false, r, d, f, 1, s.data(), w.w2[e]->value.data(), 0, out[e].data());
            }
            st.a1.push_back(std::move(a1));
            st.a3.push_back(std::move(a3));
            st.s.push_back(std::move(s));
        }
        std::lock_guard<std::mutex> lock(mutex_);
        stash_[key] = std::move(st);
    }

    std::function<void()> backward(uint64_t key, const typename ExpertCompute<T>::Weights& w,
                                   const std::vector<std::vector<T>>& d_out, std::vector<std::vector<T>>& d_rows) override {
        Stash st;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            st = std::move(stash_.at(key));
            stash_.erase(key);
        }
        int E = int(w.w1.size());
        d_rows.assign(E, {});
        auto da1s = std::make_shared<std::vector<std::vector<T>>>(E), da3s = std::make_shared<std::vector<std::vector<T>>>(E);
        for (int e = 0; e < E; ++e) {
            int d = int(w.w1[e]->shape[0]), f = int(w.w1[e]->shape[1]), r = int(d_out[e].size() / d);
            std::vector<T> ds(size_t(r) * f), &da1 = (*da1s)[e], &da3 = (*da3s)[e];
            da1.resize(ds.size()), da3.resize(ds.size());
            d_rows[e].assign(size_t(r) * d, T(0));
            if (!r) continue;
            kernels::gemm<T>(false, true, r, f, d, 1, d_out[e].data(), w.w2[e]->value.data(), 0, ds.data());
            kernels::swiglu_backward<T>(ds.data(), st.a1[e].data(), st.a3[e].data(), ds.size(), da1.data(), da3.data());
            kernels::gemm<T>(false, true, r, d, f, 1, da1.data(), w.w1[e]->value.data(), 0, d_rows[e].data());
            kernels::gemm<T>(false, true, r, d, f, 1, da3.data(), w.w3[e]->value.data(), 1, d_rows[e].data());
        }
        auto x = std::make_shared<std::vector<std::vector<T>>>(std::move(st.x));
        auto s = std::make_shared<std::vector<std::vector<T>>>(std::move(st.s));
        auto dout = std::make_shared<std::vector<std::vector<T>>>(d_out);
        auto weights = w;
        return [=] {
            for (int e = 0; e < E; ++e) {
                int d = int(weights.w1[e]->shape[0]), f = int(weights.w1[e]->shape[1]), r = int((*dout)[e].size() / d);
                if (!r) continue;
                kernels::gemm<T>(true, false, d, f, r, 1, (*x)[e].data(), (*da1s)[e].data(), 1, weights.w1[e]->grad.data());
                kernels::gemm<T>(true, false, d, f, r, 1, (*x)[e].data(), (*da3s)[e].data(), 1, weights.w3[e]->grad.data());
                kernels::gemm<T>(true, false, f, d, r, 1, (*s)[e].data(), (*dout)[e].data(), 1, weights.w2[e]->grad.data());
            }
        };
    }

    std::shared_ptr<ResidentRows> forward_resident(uint64_t key, const typename ExpertCompute<T>::Weights& w,
                                                   std::shared_ptr<ResidentRows> rows) override {
        ++resident_calls;
        std::vector<std::vector<T>> out;
        forward(key, w, unpack(*rows), out);
        return pack(out, *rows);
    }
    std::function<void()> backward_resident(uint64_t key, const typename ExpertCompute<T>::Weights& w,
                                            std::shared_ptr<ResidentRows> d_out,
                                            std::shared_ptr<ResidentRows>& d_rows) override {
        ++resident_calls;
        std::vector<std::vector<T>> dr;
        auto work = backward(key, w, unpack(*d_out), dr);
        d_rows = pack(dr, *d_out);
        return work;
    }

    std::atomic<int> resident_calls{0};

private:
    struct Stash {
        std::vector<std::vector<T>> x, a1, a3, s;
    };
    static std::vector<std::vector<T>> unpack(const ResidentRows& r) {
        std::vector<std::vector<T>> v(r.first.size() - 1);
        for (size_t e = 0; e + 1 < r.first.size(); ++e)
            v[e].assign(row_of<T>(r, r.first[e]), row_of<T>(r, r.first[e + 1]));
        return v;
    }
    static std::shared_ptr<ResidentRows> pack(const std::vector<std::vector<T>>& v, const ResidentRows& like) {
        auto out = HostRows<T>::make(like.first, like.width);
        for (size_t e = 0; e < v.size(); ++e) std::copy(v[e].begin(), v[e].end(), out->row(like.first[e]));
        return out;
    }
    bool resident_;
    std::mutex mutex_;
    std::map<uint64_t, Stash> stash_;
};

// A whole stage (embedding to loss) over EP=2: with the rows staying where the exchange put them, the loss and
// every gradient are bit for bit those of the same stage handing rows over on the host.
TEST(ExpertMajorPath, StageWithRowsWhereTheyLandEqualsTheHostHandOverBitForBit) {
    ModelConfig cfg = ModelConfig::preset("tiny");
    SyntheticTask task(cfg.vocab, cfg.seq_len, 3);
    std::map<bool, std::vector<std::vector<double>>> grads;  // by resident: rank 0's gradients
    std::map<bool, double> losses;
    for (bool resident : {false, true}) {
        LaunchOptions l;
        l.ranks = 2;
        l.timeout_s = 60;
        std::mutex m;
        launch(l, [&](const std::shared_ptr<Communicator>& world) {
            auto fwd = std::make_shared<DistributedExchange<double>>(world, cfg.experts);
            auto bwd = std::make_shared<DistributedExchange<double>>(world->split(0, world->rank()), cfg.experts);
            auto t_fwd = std::make_shared<HostResidentTransport<double>>(world->split(0, world->rank()));
            auto t_bwd = std::make_shared<HostResidentTransport<double>>(world->split(0, world->rank()));
            fwd->set_transport(t_fwd);
            bwd->set_transport(t_bwd);
            ModelStage<double> st(cfg, 0, cfg.layers, true, true, 11, fwd, bwd);
            auto experts = std::make_shared<HostExperts<double>>(resident);
            st.set_expert_compute(experts);
            Batch batch = task.batch(2, 5 + uint64_t(world->rank()));
            for (int mb = 0; mb < 2; ++mb) st.forward(mb, batch, {});
            double loss = st.loss(0) + st.loss(1);
            for (int mb = 1; mb >= 0; --mb) st.backward(mb, {});
            EXPECT_EQ(experts->resident_calls.load() > 0, resident);
            EXPECT_EQ(t_fwd->to_experts > 0, resident);
            EXPECT_EQ(t_bwd->from_experts > 0, resident);
            if (world->rank() != 0) return;
            std::lock_guard<std::mutex> lock(m);
            losses[resident] = loss;
            for (Param<double>* p : st.parameters()) grads[resident].push_back(p->grad);
        });
    }
    EXPECT_EQ(losses[true], losses[false]);
    ASSERT_EQ(grads[true].size(), grads[false].size());
    for (size_t i = 0; i < grads[true].size(); ++i) EXPECT_EQ(grads[true][i], grads[false][i]) << "parameter " << i;
}

}  // namespace
}  // namespace duplex
