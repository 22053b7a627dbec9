// The MoE layer of the built-in model: router scores, the group-limited top-K routing with its selection bias,
// dispatch to the experts' ranks (on the call's expert lanes, waited for through its context), the routed experts
// (on the CPU or an ExpertCompute), the shared experts meanwhile, and the gate-weighted combine; and its backward.
#include "runtime/model/stage_impl.hpp"

namespace duplex {

template <typename T>
void ModelStage<T>::Impl::moe_forward(Layer& L, Micro& m, LayerStash& st, std::vector<T>& f) {
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


template <typename T>
void ModelStage<T>::Impl::moe_backward(Layer& L, Micro& m, LayerStash& st, const Buf<T>& df, std::vector<T>& dn2) {
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


template void ModelStage<float>::Impl::moe_forward(Layer&, Micro&, LayerStash&, std::vector<float>&);
template void ModelStage<double>::Impl::moe_forward(Layer&, Micro&, LayerStash&, std::vector<double>&);
template void ModelStage<float>::Impl::moe_backward(Layer&, Micro&, LayerStash&, const Buf<float>&, std::vector<float>&);
template void ModelStage<double>::Impl::moe_backward(Layer&, Micro&, LayerStash&, const Buf<double>&,
                                                     std::vector<double>&);

}  // namespace duplex
