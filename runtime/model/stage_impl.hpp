// The private state of a ModelStage (runtime/model/stage.hpp) and its layer code, shared by the files that
// implement it: stage.cpp (the layer stack, attention, dense MLPs, the head) and moe_layer.cpp (the MoE layer:
// routing, the expert exchange, the routed and shared experts).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "runtime/model/stage.hpp"

namespace duplex {

using kernels::gemm;

namespace model_detail {

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

inline uint64_t name_hash(const std::string& s, uint64_t seed) {
    uint64_t h = 1469598103934665603ull ^ seed;
    for (char c : s) h = (h ^ uint8_t(c)) * 1099511628211ull;
    return h;
}

}  // namespace model_detail

using namespace model_detail;

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

    // The MoE layer's forward (routing, dispatch, experts, combine) and backward (moe_layer.cpp).
    void moe_forward(Layer& L, Micro& m, LayerStash& st, std::vector<T>& f);
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

    void moe_backward(Layer& L, Micro& m, LayerStash& st, const Buf<T>& df, std::vector<T>& dn2);

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

}  // namespace duplex
