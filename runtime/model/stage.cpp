#include "runtime/model/stage.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"

namespace duplex {

using kernels::gemm;

namespace {

template <typename T>
using Buf = std::shared_ptr<std::vector<T>>;

template <typename T>
Buf<T> buf(size_t n) {
    return std::make_shared<std::vector<T>>(n);
}
template <typename T>
Buf<T> buf(std::vector<T>&& v) {
    return std::make_shared<std::vector<T>>(std::move(v));
}

uint64_t name_hash(const std::string& s, uint64_t seed) {
    uint64_t h = 1469598103934665603ull ^ seed;
    for (char c : s) h = (h ^ uint8_t(c)) * 1099511628211ull;
    return h;
}

}  // namespace

template <typename T>
struct ModelStage<T>::Impl {
    struct Layer {
        int index = 0;
        bool moe = false;
        Param<T>*attn_norm, *wq, *wk, *wv, *wo, *ffn_norm;
        Param<T>*w1 = nullptr, *w3 = nullptr, *w2 = nullptr;  // dense FFN
        Param<T>* router = nullptr;
        std::vector<Param<T>*> e1, e3, e2;  // local routed experts
        std::vector<Param<T>*> s1, s3, s2;  // shared experts
        int moe_slot = -1;                  // index into bias_/counts
        std::vector<int64_t> counts;
    };

    // What one layer keeps between F and B of a microbatch.
    struct LayerStash {
        Buf<T> x_in, rstd1, n1, q, k, v, probs, attn, h, rstd2, n2;
        Buf<T> a1, a3, s;                       // dense FFN (s dropped under recompute)
        Buf<T> scores;                          // MoE
        Routing routing;
        RoutedTokens<T> routed;
        std::vector<Buf<T>> ea1, ea3, es, sa1, sa3, ss;  // per local / shared expert
        std::vector<Buf<T>> erows;                       // per local expert input rows
    };

    struct Micro {
        int id = 0;
        int tokens = 0, B = 0, S = 0;
        std::vector<int> ids, targets, pos;
        std::vector<LayerStash> layers;
        Buf<T> head_in, rstd_f, nf, dlogits;
        double loss = 0, aux_loss = 0;
        std::vector<std::function<void()>> wgrad;
        std::set<const void*> counted;  // buffers already in the ledger's weight-gradient category
        int64_t act_bytes = 0, w_bytes = 0;
        bool forward_done = false, backward_done = false;
        StageContext* ctx = nullptr;  // the stage call running this microbatch's F or B (null: none)
    };

    ModelStage<T>& self;
    std::deque<Param<T>> params;
    Param<T>*embed = nullptr, *final_norm = nullptr, *head = nullptr;
    std::vector<Layer> layers;
    std::shared_ptr<ExpertExchange<T>> exchange, bwd_exchange;  // backward: may run beside another forward
    int first_expert = 0, local_experts = 0;                     // the routed experts held here
    std::map<int, Micro> micro;
    uint64_t seed;

    Impl(ModelStage<T>& s, uint64_t seed_) : self(s), seed(seed_) {}

    Param<T>* make(const std::string& name, std::vector<int64_t> shape, bool ones = false, bool expert = false) {
        Param<T> p;
        p.name = name;
        p.shape = shape;
        p.is_expert = expert;
        size_t n = 1;
        for (int64_t d : shape) n *= size_t(d);
        p.value.resize(n);
        p.grad.assign(n, T(0));
        Rng rng(name_hash(name, seed));
        for (T& v : p.value) v = ones ? T(1) : T(rng.normal() * self.cfg_.init_std);
        params.push_back(std::move(p));
        return &params.back();
    }

    const ModelConfig& cfg() const { return self.cfg_; }
    int A() const { return cfg().heads * cfg().head_dim; }

    // ---- helpers over row-major activations ----
    static void linear(const std::vector<T>& x, const Param<T>* w, int rows, std::vector<T>& y) {
        int in = int(w->shape[0]), out = int(w->shape[1]);
        y.resize(size_t(rows) * out);
        gemm<T>(false, false, rows, out, in, T(1), x.data(), w->value.data(), T(0), y.data());
    }
    // dx (+)= dy W^T
    static void linear_dx(const std::vector<T>& dy, const Param<T>* w, int rows, std::vector<T>& dx, bool accumulate) {
        int in = int(w->shape[0]), out = int(w->shape[1]);
        if (!accumulate) dx.assign(size_t(rows) * in, T(0));
        gemm<T>(false, true, rows, in, out, T(1), dy.data(), w->value.data(), T(1), dx.data());
    }
    // Queue dW += x^T dy for the W pass.
    void defer_dw(Micro& m, const Buf<T>& x, const Buf<T>& dy, int rows, Param<T>* w) {
        for (const Buf<T>& b : {x, dy}) {
            if (m.counted.insert(b.get()).second) {
                int64_t bytes = int64_t(b->size() * sizeof(T));
                m.w_bytes += bytes;
                self.ledger_.add("wgrad_inputs", bytes);
            }
        }
        m.wgrad.push_back([x, dy, rows, w] {
            int in = int(w->shape[0]), out = int(w->shape[1]);
            gemm<T>(true, false, in, out, rows, T(1), x->data(), dy->data(), T(1), w->grad.data());
        });
    }

    // B of an RMSNorm: acc += d(input) for upstream gradient dy; queues the gain's gradient for W.
    void norm_backward(Micro& m, std::vector<T>&& dy, const Buf<T>& x, const Buf<T>& rstd, Param<T>* g, int rows,
                       std::vector<T>& acc) {
        int d = cfg().hidden;
        std::vector<T> tmp(acc.size());
        kernels::rmsnorm_backward_input<T>(dy.data(), x->data(), g->value.data(), rstd->data(), rows, d, tmp.data());
        for (size_t i = 0; i < acc.size(); ++i) acc[i] += tmp[i];
        auto dyb = buf<T>(std::move(dy));
        m.wgrad.push_back([dyb, x, rstd, g, rows, d] {
            kernels::rmsnorm_backward_weight<T>(dyb->data(), x->data(), rstd->data(), rows, d, g->grad.data());
        });
    }

    Buf<T> rmsnorm(const std::vector<T>& x, const Param<T>* g, int rows, Buf<T>& rstd) {
        int d = cfg().hidden;
        auto y = buf<T>(size_t(rows) * d);
        if (!rstd) rstd = buf<T>(size_t(rows));
        kernels::rmsnorm_forward<T>(x.data(), g->value.data(), rows, d, T(cfg().norm_eps), y->data(), rstd->data());
        return y;
    }

    // A SwiGLU MLP on rows x: returns (a1, a3, s) and writes out = s W2.
    void mlp_forward(const std::vector<T>& x, int rows, Param<T>* w1, Param<T>* w3, Param<T>* w2, Buf<T>& a1, Buf<T>& a3,
                     Buf<T>& s, std::vector<T>& out) {
        a1 = buf<T>(0);
        a3 = buf<T>(0);
        linear(x, w1, rows, *a1);
        linear(x, w3, rows, *a3);
        s = buf<T>(a1->size());
        kernels::swiglu_forward<T>(a1->data(), a3->data(), a1->size(), s->data());
        linear(*s, w2, rows, out);
    }
    // Backward of the MLP: dx (+)= d(input); queues the three weight gradients.
    void mlp_backward(Micro& m, const Buf<T>& x, int rows, Param<T>* w1, Param<T>* w3, Param<T>* w2, const Buf<T>& a1,
                      const Buf<T>& a3, Buf<T> s, const Buf<T>& dout, std::vector<T>& dx, bool accumulate) {
        if (!s) {  // recompute the SwiGLU activation
            s = buf<T>(a1->size());
            kernels::swiglu_forward<T>(a1->data(), a3->data(), a1->size(), s->data());
        }
        std::vector<T> ds;
        linear_dx(*dout, w2, rows, ds, false);
        defer_dw(m, s, dout, rows, w2);
        auto da1 = buf<T>(ds.size()), da3 = buf<T>(ds.size());
        kernels::swiglu_backward<T>(ds.data(), a1->data(), a3->data(), ds.size(), da1->data(), da3->data());
        linear_dx(*da1, w1, rows, dx, accumulate);
        linear_dx(*da3, w3, rows, dx, true);
        defer_dw(m, x, da1, rows, w1);
        defer_dw(m, x, da3, rows, w3);
    }

    // ---- layer forward ----
    std::vector<T> layer_forward(Layer& L, Micro& m, LayerStash& st, std::vector<T>&& x) {
        const ModelConfig& c = cfg();
        int n = m.tokens, d = c.hidden;
        st.x_in = buf<T>(std::move(x));
        st.n1 = rmsnorm(*st.x_in, L.attn_norm, n, st.rstd1);
        st.q = buf<T>(0);
        st.k = buf<T>(0);
        st.v = buf<T>(0);
        linear(*st.n1, L.wq, n, *st.q);
        linear(*st.n1, L.wk, n, *st.k);
        linear(*st.n1, L.wv, n, *st.v);
        kernels::rope<T>(st.q->data(), m.pos.data(), n, c.heads, c.head_dim, c.rope_base, false);
        kernels::rope<T>(st.k->data(), m.pos.data(), n, c.heads, c.head_dim, c.rope_base, false);
        st.attn = buf<T>(size_t(n) * A());
        st.probs = buf<T>(size_t(m.B) * c.heads * m.S * m.S);
        kernels::attention_forward<T>(st.q->data(), st.k->data(), st.v->data(), m.B, m.S, c.heads, c.head_dim,
                                      st.attn->data(), st.probs->data());
        std::vector<T> o;
        linear(*st.attn, L.wo, n, o);
        st.h = buf<T>(std::vector<T>(*st.x_in));
        for (size_t i = 0; i < o.size(); ++i) (*st.h)[i] += o[i];
        st.n2 = rmsnorm(*st.h, L.ffn_norm, n, st.rstd2);
        std::vector<T> f(size_t(n) * d, T(0));
        if (!L.moe) {
            mlp_forward(*st.n2, n, L.w1, L.w3, L.w2, st.a1, st.a3, st.s, f);
        } else {
            moe_forward(L, m, st, f);
        }
        std::vector<T> out(*st.h);
        for (size_t i = 0; i < out.size(); ++i) out[i] += f[i];
        if (self.recompute_) {
            st.n1.reset();
            st.n2.reset();
            st.s.reset();
            for (auto& b : st.es) b.reset();
            for (auto& b : st.ss) b.reset();
        }
        return out;
    }

    // Sequence-wise balance loss alpha * sum_i f_i P_i per sequence, averaged over the sequences:
    // f_i = E / (K S) * (tokens of the sequence routed to i), P_i = mean over its tokens of s_i / sum_j s_j.
    // With ds, adds d(loss_scale * loss)/d(scores) into ds[tokens, E].
    double balance_loss(const Micro& m, const LayerStash& st, std::vector<double>* ds) const {
        const ModelConfig& c = cfg();
        int E = c.experts, K = c.top_k, S = m.S;
        double total = 0;
        for (int b = 0; b < m.B; ++b) {
            std::vector<double> f(E, 0.0), P(E, 0.0);
            for (int t = b * S; t < (b + 1) * S; ++t)
                for (int k = 0; k < K; ++k) f[st.routing.expert[size_t(t) * K + k]] += double(E) / (double(K) * S);
            for (int t = b * S; t < (b + 1) * S; ++t) {
                const T* s = st.scores->data() + size_t(t) * E;
                double sum = 0;
                for (int e = 0; e < E; ++e) sum += double(s[e]);
                for (int e = 0; e < E; ++e) P[e] += double(s[e]) / sum / S;
                if (ds) {
                    double cross = 0;  // sum_i dL/ds'_i * s'_i
                    for (int e = 0; e < E; ++e) cross += f[e] * double(s[e]) / sum;
                    double scale = c.balance_alpha / S / m.B * self.loss_scale_;
                    for (int e = 0; e < E; ++e) (*ds)[size_t(t) * E + e] += scale * (f[e] - cross) / sum;
                }
            }
            for (int e = 0; e < E; ++e) total += c.balance_alpha * f[e] * P[e];
        }
        return total / m.B;
    }

    // Starts an exchange on the call's expert lane (or runs it here without one); finish() waits for it through
    // the call's context, so the executor decides what runs meanwhile.
    static WorkPtr start(const Micro& m, ExpertService::Lane lane, std::function<void()> fn) {
        ExpertService* lanes = m.ctx ? m.ctx->experts() : nullptr;
        if (!lanes) {
            fn();
            return nullptr;
        }
        return lanes->submit(lane, std::move(fn));
    }
    static void finish(const WorkPtr& w, const char* what, const Layer& L, const Micro& m) {
        if (!w) return;
        if (m.ctx)
            m.ctx->wait(w, fmt::format("{} L{} mb {}", what, L.index, m.id));
        else
            w->wait();
    }

    // Whether the forward and backward exchanges leave rows where the expert compute reads them (the same device).
    bool rows_stay_where_experts_read() const {
        const auto& dev = self.expert_compute_;
        if (!dev || !exchange || !bwd_exchange) return false;
        int where = exchange->rows_stay_on();
        return where != kRowsMove && bwd_exchange->rows_stay_on() == where && dev->reads_rows_on(where);
    }

    // Names (layer, microbatch) for the expert compute.
    uint64_t expert_key(const Layer& L, const Micro& m) const { return (uint64_t(m.id) << 32) | uint32_t(L.index); }

    void moe_forward(Layer& L, Micro& m, LayerStash& st, std::vector<T>& f) {
        const ModelConfig& c = cfg();
        int n = m.tokens, d = c.hidden;
        std::vector<T> u;
        linear(*st.n2, L.router, n, u);
        st.scores = buf<T>(u.size());
        for (size_t i = 0; i < u.size(); ++i) (*st.scores)[i] = T(1) / (T(1) + std::exp(-u[i]));
        st.routing = route<T>(st.scores->data(), self.bias_[L.moe_slot], n, c);
        for (int e : st.routing.expert) ++L.counts[e];
        if (c.balance_alpha > 0) m.aux_loss += balance_loss(m, st, nullptr);
        // Routed experts: the dispatch is in flight while the shared experts (which see every token) compute. Where
        // the exchanges and the expert compute share a device, the rows stay there from dispatch to combine.
        st.routed.keep_rows = rows_stay_where_experts_read();
        WorkPtr dispatched = start(m, ExpertService::Forward,
                                   [&] { exchange->dispatch(st.n2->data(), d, st.routing, st.routed); });
        int shared = c.shared_experts;
        st.sa1.resize(shared), st.sa3.resize(shared), st.ss.resize(shared);
        try {
            for (int j = 0; j < shared; ++j) {
                std::vector<T> out;
                mlp_forward(*st.n2, n, L.s1[j], L.s3[j], L.s2[j], st.sa1[j], st.sa3[j], st.ss[j], out);
                for (size_t i = 0; i < f.size(); ++i) f[i] += out[i];
            }
        } catch (...) {
            if (dispatched) dispatched->wait();  // the exchange still writes into st.routed
            throw;
        }
        finish(dispatched, "dispatch", L, m);
        int local = exchange->num_local_experts();
        std::vector<std::vector<T>> outputs(local);
        if (const auto& dev = self.expert_compute_) {
            std::vector<T> y(size_t(n) * d);
            if (st.routed.keep_rows) {
                auto out = dev->forward_resident(expert_key(L, m), {L.e1, L.e3, L.e2}, std::move(st.routed.resident));
                finish(start(m, ExpertService::Forward,
                             [&] { exchange->combine_resident(st.routed, *out, d, st.routing, y.data()); }),
                       "combine", L, m);
            } else {
                dev->forward(expert_key(L, m), {L.e1, L.e3, L.e2}, st.routed.rows, outputs);
                st.routed.rows.clear();
                finish(start(m, ExpertService::Forward,
                             [&] { exchange->combine(st.routed, outputs, d, st.routing, y.data()); }),
                       "combine", L, m);
            }
            for (size_t i = 0; i < f.size(); ++i) f[i] += y[i];
            return;
        }
        st.ea1.resize(local), st.ea3.resize(local), st.es.resize(local), st.erows.resize(local);
        for (int e = 0; e < local; ++e) {
            int rows = int(st.routed.slots[e].size());
            st.erows[e] = buf<T>(std::move(st.routed.rows[e]));
            mlp_forward(*st.erows[e], rows, L.e1[e], L.e3[e], L.e2[e], st.ea1[e], st.ea3[e], st.es[e], outputs[e]);
        }
        std::vector<T> y(size_t(n) * d);
        finish(start(m, ExpertService::Forward, [&] { exchange->combine(st.routed, outputs, d, st.routing, y.data()); }),
               "combine", L, m);
        for (size_t i = 0; i < f.size(); ++i) f[i] += y[i];
    }

    // ---- layer backward (B; W work queued) ----
    std::vector<T> layer_backward(Layer& L, Micro& m, LayerStash& st, const std::vector<T>& dout) {
        const ModelConfig& c = cfg();
        int n = m.tokens;
        if (!st.n2) st.n2 = rmsnorm(*st.h, L.ffn_norm, n, st.rstd2);  // recompute
        auto df = buf<T>(std::vector<T>(dout));
        std::vector<T> dn2;
        if (!L.moe) {
            mlp_backward(m, st.n2, n, L.w1, L.w3, L.w2, st.a1, st.a3, st.s, df, dn2, false);
        } else {
            moe_backward(L, m, st, df, dn2);
        }
        std::vector<T> dh(dout);
        norm_backward(m, std::move(dn2), st.h, st.rstd2, L.ffn_norm, n, dh);
        // Attention.
        auto dhb = buf<T>(std::vector<T>(dh));
        std::vector<T> dattn;
        linear_dx(*dhb, L.wo, n, dattn, false);
        defer_dw(m, st.attn, dhb, n, L.wo);
        auto dq = buf<T>(dattn.size()), dk = buf<T>(dattn.size()), dv = buf<T>(dattn.size());
        kernels::attention_backward<T>(dattn.data(), st.q->data(), st.k->data(), st.v->data(), st.probs->data(), m.B, m.S,
                                       c.heads, c.head_dim, dq->data(), dk->data(), dv->data());
        kernels::rope<T>(dq->data(), m.pos.data(), n, c.heads, c.head_dim, c.rope_base, true);
        kernels::rope<T>(dk->data(), m.pos.data(), n, c.heads, c.head_dim, c.rope_base, true);
        if (!st.n1) st.n1 = rmsnorm(*st.x_in, L.attn_norm, n, st.rstd1);  // recompute
        std::vector<T> dn1;
        linear_dx(*dq, L.wq, n, dn1, false);
        linear_dx(*dk, L.wk, n, dn1, true);
        linear_dx(*dv, L.wv, n, dn1, true);
        defer_dw(m, st.n1, dq, n, L.wq);
        defer_dw(m, st.n1, dk, n, L.wk);
        defer_dw(m, st.n1, dv, n, L.wv);
        std::vector<T> dx(dh);
        norm_backward(m, std::move(dn1), st.x_in, st.rstd1, L.attn_norm, n, dx);
        return dx;
    }

    void moe_backward(Layer& L, Micro& m, LayerStash& st, const Buf<T>& df, std::vector<T>& dn2) {
        const ModelConfig& c = cfg();
        int n = m.tokens, d = c.hidden, E = c.experts, K = c.top_k;
        dn2.assign(size_t(n) * d, T(0));
        // Combine backward (each slot's output gets gate * df; each gate gets df . output) is in flight while the
        // shared experts' backward computes.
        std::vector<std::vector<T>> d_out;
        std::vector<double> dgate;
        const bool resident = st.routed.keep_rows;  // the forward's rows stayed on the device: so do these
        std::shared_ptr<ResidentRows> d_out_resident, d_rows_resident;
        WorkPtr combined = start(m, ExpertService::Backward, [&] {
            if (resident)
                bwd_exchange->combine_backward_resident(st.routed, df->data(), d, st.routing, d_out_resident, dgate);
            else
                bwd_exchange->combine_backward(st.routed, df->data(), d, st.routing, d_out, dgate);
        });
        try {
            for (int j = 0; j < c.shared_experts; ++j)
                mlp_backward(m, st.n2, n, L.s1[j], L.s3[j], L.s2[j], st.sa1[j], st.sa3[j], st.ss[j], df, dn2, true);
        } catch (...) {
            if (combined) combined->wait();
            throw;
        }
        finish(combined, "combine-bwd", L, m);
        int local = exchange->num_local_experts();
        std::vector<std::vector<T>> d_rows(local);
        if (const auto& dev = self.expert_compute_) {
            if (resident)
                m.wgrad.push_back(
                    dev->backward_resident(expert_key(L, m), {L.e1, L.e3, L.e2}, std::move(d_out_resident), d_rows_resident));
            else
                m.wgrad.push_back(dev->backward(expert_key(L, m), {L.e1, L.e3, L.e2}, d_out, d_rows));
        }
        for (int e = 0; e < local && !self.expert_compute_; ++e) {
            int rows = int(st.routed.slots[e].size());
            auto dout_e = buf<T>(std::move(d_out[e]));
            mlp_backward(m, st.erows[e], rows, L.e1[e], L.e3[e], L.e2[e], st.ea1[e], st.ea3[e], st.es[e], dout_e, d_rows[e],
                         false);
            d_rows[e].resize(size_t(rows) * d);
        }
        finish(start(m, ExpertService::Backward,
                     [&] {
                         if (resident)
                             bwd_exchange->dispatch_backward_resident(st.routed, *d_rows_resident, d, st.routing, dn2.data());
                         else
                             bwd_exchange->dispatch_backward(st.routed, d_rows, d, st.routing, dn2.data());
                     }),
               "dispatch-bwd", L, m);
        // Gates: g_k = scale * s_k / S over the selected experts; then through the sigmoid.
        auto du = buf<T>(size_t(n) * E);
        std::vector<double> ds(size_t(n) * E, 0.0);
        if (c.balance_alpha > 0) balance_loss(m, st, &ds);
        for (int t = 0; t < n; ++t) {
            double S = st.routing.sel_sum[t], cross = 0;
            for (int k = 0; k < K; ++k) cross += dgate[size_t(t) * K + k] * st.routing.gate[size_t(t) * K + k];
            for (int k = 0; k < K; ++k) {
                int e = st.routing.expert[size_t(t) * K + k];
                ds[size_t(t) * E + e] += (c.route_scale * dgate[size_t(t) * K + k] - cross) / S;
            }
            for (int e = 0; e < E; ++e) {
                double s = (*st.scores)[size_t(t) * E + e];
                (*du)[size_t(t) * E + e] = T(ds[size_t(t) * E + e] * s * (1 - s));
            }
        }
        linear_dx(*du, L.router, n, dn2, true);
        defer_dw(m, st.n2, du, n, L.router);
    }

    int64_t stash_bytes(const LayerStash& st) const {
        int64_t b = 0;
        auto add = [&](const Buf<T>& x) {
            if (x) b += int64_t(x->size() * sizeof(T));
        };
        for (const Buf<T>* x : {&st.x_in, &st.rstd1, &st.n1, &st.q, &st.k, &st.v, &st.probs, &st.attn, &st.h, &st.rstd2,
                                &st.n2, &st.a1, &st.a3, &st.s, &st.scores})
            add(*x);
        for (const auto* v : {&st.ea1, &st.ea3, &st.es, &st.sa1, &st.sa3, &st.ss, &st.erows})
            for (const Buf<T>& x : *v) add(x);
        b += int64_t((st.routed.slot_outputs.size() + st.routed.relay_outputs.size()) * sizeof(T));
        return b;
    }
};

template <typename T>
ModelStage<T>::ModelStage(const ModelConfig& cfg, int first_layer, int num_layers, bool has_embedding, bool has_head,
                          uint64_t seed, std::shared_ptr<ExpertExchange<T>> exchange,
                          std::shared_ptr<ExpertExchange<T>> backward_exchange, ExpertShard shard)
    : cfg_(cfg), first_layer_(first_layer), num_layers_(num_layers), has_embedding_(has_embedding), has_head_(has_head) {
    cfg_.validate();
    DUPLEX_CHECK_ARG(first_layer >= 0 && num_layers >= 0 && first_layer + num_layers <= cfg.layers, "stage layers",
                     "layers {}..{} outside the model's {}", first_layer, first_layer + num_layers - 1, cfg.layers);
    impl_ = std::make_unique<Impl>(*this, seed);
    Impl& I = *impl_;
    if (!exchange && shard.ranks == 1) exchange = std::make_shared<LocalExchange<T>>(cfg.experts);
    if (exchange) {
        I.first_expert = exchange->first_local_expert();
        I.local_experts = exchange->num_local_experts();
    } else {
        ExpertPlacement placement(cfg.experts, shard.ranks);
        DUPLEX_CHECK_ARG(shard.rank >= 0 && shard.rank < shard.ranks, "expert shard", "rank {} of {}", shard.rank,
                         shard.ranks);
        I.first_expert = placement.first_expert(shard.rank);
        I.local_experts = placement.per_rank();
    }
    I.exchange = exchange;
    I.bwd_exchange = backward_exchange ? backward_exchange : exchange;
    int d = cfg.hidden, A = cfg.heads * cfg.head_dim;
    if (has_embedding) I.embed = I.make("embed", {cfg.vocab, d});
    for (int l = first_layer; l < first_layer + num_layers; ++l) {
        typename Impl::Layer L;
        L.index = l;
        L.moe = cfg.is_moe_layer(l);
        std::string p = fmt::format("layer{}.", l);
        L.attn_norm = I.make(p + "attn_norm", {d}, true);
        L.wq = I.make(p + "wq", {d, A});
        L.wk = I.make(p + "wk", {d, A});
        L.wv = I.make(p + "wv", {d, A});
        L.wo = I.make(p + "wo", {A, d});
        L.ffn_norm = I.make(p + "ffn_norm", {d}, true);
        if (!L.moe) {
            L.w1 = I.make(p + "w1", {d, cfg.dense_ffn});
            L.w3 = I.make(p + "w3", {d, cfg.dense_ffn});
            L.w2 = I.make(p + "w2", {cfg.dense_ffn, d});
        } else {
            L.router = I.make(p + "router", {d, cfg.experts});
            for (int j = 0; j < cfg.shared_experts; ++j) {
                std::string q = p + fmt::format("shared{}.", j);
                L.s1.push_back(I.make(q + "w1", {d, cfg.expert_ffn}));
                L.s3.push_back(I.make(q + "w3", {d, cfg.expert_ffn}));
                L.s2.push_back(I.make(q + "w2", {cfg.expert_ffn, d}));
            }
            for (int e = I.first_expert; e < I.first_expert + I.local_experts; ++e) {
                std::string q = p + fmt::format("expert{}.", e);
                L.e1.push_back(I.make(q + "w1", {d, cfg.expert_ffn}, false, true));
                L.e3.push_back(I.make(q + "w3", {d, cfg.expert_ffn}, false, true));
                L.e2.push_back(I.make(q + "w2", {cfg.expert_ffn, d}, false, true));
            }
            L.moe_slot = static_cast<int>(bias_.size());
            bias_.emplace_back(cfg.experts, 0.0);
            L.counts.assign(cfg.experts, 0);
        }
        I.layers.push_back(std::move(L));
    }
    if (has_head) {
        I.final_norm = I.make("final_norm", {d}, true);
        I.head = I.make("head", {d, cfg.vocab});
    }
}

template <typename T>
ModelStage<T>::~ModelStage() = default;

template <typename T>
void ModelStage<T>::set_exchanges(std::shared_ptr<ExpertExchange<T>> exchange,
                                  std::shared_ptr<ExpertExchange<T>> backward_exchange) {
    Impl& I = *impl_;
    if (!backward_exchange) backward_exchange = exchange;
    for (const auto* x : {exchange.get(), backward_exchange.get()})
        DUPLEX_CHECK_ARG(x && x->first_local_expert() == I.first_expert && x->num_local_experts() == I.local_experts,
                         "expert exchange", "it must hold experts {}..{} of this stage",
                         I.first_expert, I.first_expert + I.local_experts - 1);
    I.exchange = std::move(exchange);
    I.bwd_exchange = std::move(backward_exchange);
}

template <typename T>
std::vector<T> ModelStage<T>::forward(int mb, const Batch& batch, std::vector<T> input, StageContext* ctx) {
    Impl& I = *impl_;
    if (!I.exchange)
        throw Error(fmt::format("stage {}: its experts are sharded over an expert-parallel group but it has no exchange "
                                "(set_exchanges, or the Stage's prepare, comes before the first forward)",
                                first_layer_));
    auto [it, fresh] = I.micro.try_emplace(mb);
    if (!fresh) throw Error(fmt::format("stage {}: forward of microbatch {} twice", first_layer_, mb));
    auto& m = it->second;
    m.id = mb;
    m.ctx = ctx;
    m.B = batch.sequences;
    m.S = batch.seq_len;
    m.tokens = batch.num_tokens();
    int d = cfg_.hidden;
    m.pos.resize(m.tokens);
    for (int t = 0; t < m.tokens; ++t) m.pos[t] = t % m.S;
    std::vector<T> x;
    if (has_embedding_) {
        DUPLEX_CHECK_ARG(int(batch.tokens.size()) == m.tokens, "batch", "{} tokens for {} x {}", batch.tokens.size(), m.B,
                         m.S);
        for (int id : batch.tokens)
            DUPLEX_CHECK_ARG(id >= 0 && id < cfg_.vocab, "batch", "token {} outside the vocabulary of {}", id, cfg_.vocab);
        m.ids = batch.tokens;
        x.resize(size_t(m.tokens) * d);
        kernels::embedding_forward<T>(I.embed->value.data(), m.ids.data(), m.tokens, d, x.data());
    } else {
        DUPLEX_CHECK_ARG(input.size() == size_t(m.tokens) * d, "stage input", "{} values for {} tokens x {}", input.size(),
                         m.tokens, d);
        x = std::move(input);
    }
    m.layers.resize(I.layers.size());
    for (size_t l = 0; l < I.layers.size(); ++l) x = I.layer_forward(I.layers[l], m, m.layers[l], std::move(x));
    for (auto& st : m.layers) m.act_bytes += I.stash_bytes(st);
    if (has_head_) {
        m.targets = batch.targets;
        m.head_in = buf<T>(std::move(x));
        m.nf = I.rmsnorm(*m.head_in, I.final_norm, m.tokens, m.rstd_f);
        std::vector<T> logits;
        I.linear(*m.nf, I.head, m.tokens, logits);
        m.dlogits = buf<T>(logits.size());
        m.loss = kernels::softmax_cross_entropy<T>(logits.data(), m.targets.data(), m.tokens, cfg_.vocab,
                                                   m.dlogits->data(), loss_scale_);
        m.act_bytes += int64_t((m.head_in->size() + m.nf->size() + m.rstd_f->size() + m.dlogits->size()) * sizeof(T));
        x.clear();
    }
    ledger_.add("activations", m.act_bytes);
    m.forward_done = true;
    return x;
}

template <typename T>
double ModelStage<T>::loss(int mb) const {
    auto it = impl_->micro.find(mb);
    if (it == impl_->micro.end() || !has_head_) throw Error(fmt::format("no loss for microbatch {} on this stage", mb));
    return it->second.loss;
}

template <typename T>
double ModelStage<T>::aux_loss(int mb) const {
    auto it = impl_->micro.find(mb);
    if (it == impl_->micro.end()) throw Error(fmt::format("no microbatch {} on this stage", mb));
    return it->second.aux_loss;
}

template <typename T>
std::vector<T> ModelStage<T>::backward_input(int mb, std::vector<T> grad_output, StageContext* ctx) {
    Impl& I = *impl_;
    auto it = I.micro.find(mb);
    if (it == I.micro.end() || !it->second.forward_done || it->second.backward_done)
        throw Error(fmt::format("stage {}: backward of microbatch {} without its forward", first_layer_, mb));
    auto& m = it->second;
    m.ctx = ctx;
    int d = cfg_.hidden;
    std::vector<T> dx;
    if (has_head_) {
        std::vector<T> dnf;
        I.linear_dx(*m.dlogits, I.head, m.tokens, dnf, false);
        I.defer_dw(m, m.nf, m.dlogits, m.tokens, I.head);
        dx.assign(dnf.size(), T(0));
        I.norm_backward(m, std::move(dnf), m.head_in, m.rstd_f, I.final_norm, m.tokens, dx);
    } else {
        DUPLEX_CHECK_ARG(grad_output.size() == size_t(m.tokens) * d, "stage output gradient", "{} values for {} x {}",
                         grad_output.size(), m.tokens, d);
        dx = std::move(grad_output);
    }
    for (size_t l = I.layers.size(); l-- > 0;) dx = I.layer_backward(I.layers[l], m, m.layers[l], dx);
    if (has_embedding_) {
        auto dxb = buf<T>(std::move(dx));
        auto ids = m.ids;
        Param<T>* e = I.embed;
        int n = m.tokens;
        m.wgrad.push_back([dxb, ids, e, n, d] {
            kernels::embedding_backward_weight<T>(dxb->data(), ids.data(), n, d, e->grad.data());
        });
        dx.clear();
    }
    m.layers.clear();  // activations no longer needed (W keeps what it uses)
    ledger_.release("activations", m.act_bytes);
    m.backward_done = true;
    return dx;
}

template <typename T>
void ModelStage<T>::backward_weight(int mb) {
    Impl& I = *impl_;
    auto it = I.micro.find(mb);
    if (it == I.micro.end() || !it->second.backward_done)
        throw Error(fmt::format("stage {}: weight gradient of microbatch {} before its backward", first_layer_, mb));
    for (auto& f : it->second.wgrad) f();
    ledger_.release("wgrad_inputs", it->second.w_bytes);
    I.micro.erase(it);
}

template <typename T>
std::vector<T> ModelStage<T>::backward(int mb, std::vector<T> grad_output, StageContext* ctx) {
    std::vector<T> dx = backward_input(mb, std::move(grad_output), ctx);
    backward_weight(mb);
    return dx;
}

template <typename T>
std::vector<Param<T>*> ModelStage<T>::parameters() {
    std::vector<Param<T>*> out;
    for (auto& p : impl_->params) out.push_back(&p);
    return out;
}

template <typename T>
void ModelStage<T>::zero_grad() {
    for (auto& p : impl_->params) std::fill(p.grad.begin(), p.grad.end(), T(0));
    // A step starts: the optimizer (or a checkpoint load) may have changed the weights since the last one.
    if (expert_compute_) expert_compute_->weights_changed();
}

template <typename T>
std::vector<std::vector<int64_t>> ModelStage<T>::take_expert_counts() {
    std::vector<std::vector<int64_t>> out;
    for (auto& L : impl_->layers)
        if (L.moe) {
            out.push_back(L.counts);
            std::fill(L.counts.begin(), L.counts.end(), 0);
        }
    return out;
}

template <typename T>
void ModelStage<T>::update_router_bias(const std::vector<std::vector<int64_t>>& counts) {
    for (size_t i = 0; i < bias_.size() && i < counts.size(); ++i) update_bias(bias_[i], counts[i], cfg_.bias_update_speed);
}

template <typename T>
std::shared_ptr<ResidentRows> ExpertCompute<T>::forward_resident(uint64_t, const Weights&, std::shared_ptr<ResidentRows>) {
    throw Error(fmt::format("expert compute {} reads rows on the host only (reads_rows_on)", name()));
}

template <typename T>
std::function<void()> ExpertCompute<T>::backward_resident(uint64_t, const Weights&, std::shared_ptr<ResidentRows>,
                                                          std::shared_ptr<ResidentRows>&) {
    throw Error(fmt::format("expert compute {} reads rows on the host only (reads_rows_on)", name()));
}

template class ExpertCompute<float>;
template class ExpertCompute<double>;
template class ModelStage<float>;
template class ModelStage<double>;

}  // namespace duplex
