#include "runtime/model/stage.hpp"

#include "runtime/model/stage_impl.hpp"

namespace duplex {

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
    m.ctx = nullptr;  // the call's context ends with the call
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
    m.ctx = nullptr;
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
void ModelStage<T>::discard(int mb) {
    Impl& I = *impl_;
    auto it = I.micro.find(mb);
    if (it == I.micro.end()) return;
    if (it->second.forward_done && !it->second.backward_done) ledger_.release("activations", it->second.act_bytes);
    if (it->second.backward_done) ledger_.release("wgrad_inputs", it->second.w_bytes);
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
