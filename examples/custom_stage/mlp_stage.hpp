// A model of one's own under Duplex: a stack of tanh layers y = tanh(x W + b) regressing a smooth target,
// split into pipeline stages through the Stage contract. Everything Duplex needs is here: forward, the input
// gradient (B) with the weight gradients deferred to W, the loss on the last stage, and the parameters as
// named state buffers. Duplex schedules it (any schedule), moves activations, sums DualPipe's two copies,
// shards AdamW over data-parallel replicas (ZeRO-1) and keeps the EMA.
//
// Data needs no batch source: the first stage draws microbatch (step, global)'s inputs from a hash, the last
// stage draws the same inputs to compute its target, so every split of the model sees the same batch.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <duplex/runtime/exec/stage.hpp>

namespace mlp {

struct Config {
    int layers = 8;     // split over the pipeline stages
    int width = 16;
    int rows = 8;       // samples per microbatch
    uint64_t seed = 7;
};

inline double hash_unit(uint64_t a, uint64_t b, uint64_t c) {  // deterministic value in [-1, 1)
    uint64_t h = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^ c * 0x94D049BB133111EBull;
    h ^= h >> 31, h *= 0xD6E8FEB86659FD93ull, h ^= h >> 32;
    return double(h >> 11) / double(1ull << 52) - 1.0;
}

class MlpStage : public duplex::Stage {
public:
    MlpStage(const Config& c, const duplex::StageInfo& info) : c_(c), info_(info) {
        for (int l = info.first_layer; l < info.first_layer + info.num_layers; ++l) {
            Layer L;
            L.index = l;
            L.w.resize(size_t(c.width) * c.width), L.b.assign(c.width, 0.0);
            for (size_t i = 0; i < L.w.size(); ++i) L.w[i] = hash_unit(c.seed, l, i) / std::sqrt(double(c.width));
            L.dw.assign(L.w.size(), 0.0), L.db.assign(c.width, 0.0);
            layers_.push_back(std::move(L));
        }
    }
    std::string name() const override { return "mlp stage " + std::to_string(info_.stage); }
    duplex::TensorSpec input_spec(const duplex::Microbatch&) const override {
        return {duplex::DType::F64, {c_.rows, c_.width}, duplex::Device::cpu()};
    }
    duplex::TensorSpec output_spec(const duplex::Microbatch& mb) const override { return input_spec(mb); }

    duplex::Tensor forward(const duplex::Microbatch& mb, const duplex::TensorView& input) override {
        std::vector<double> x = info_.stage == 0 ? inputs(mb) : values(input);
        Stash& st = stash(mb.id);
        for (Layer& L : layers_) {
            st.x.push_back(x);
            std::vector<double> y(x.size());
            for (int r = 0; r < c_.rows; ++r)
                for (int j = 0; j < c_.width; ++j) {
                    double z = L.b[j];
                    for (int i = 0; i < c_.width; ++i) z += x[size_t(r) * c_.width + i] * L.w[size_t(i) * c_.width + j];
                    y[size_t(r) * c_.width + j] = std::tanh(z);
                }
            st.y.push_back(y);
            x = std::move(y);
        }
        if (info_.stage == info_.num_stages - 1) {  // mean squared error against the target
            std::vector<double> t = targets(mb);
            st.dout.resize(x.size());
            double loss = 0;
            for (size_t i = 0; i < x.size(); ++i) {
                loss += 0.5 * (x[i] - t[i]) * (x[i] - t[i]) / double(c_.rows);
                st.dout[i] = (x[i] - t[i]) / double(c_.rows) * info_.loss_scale;
            }
            st.loss = loss;
            return {};
        }
        return duplex::Tensor::from_vector(std::move(x), {c_.rows, c_.width});
    }
    double loss(const duplex::Microbatch& mb) override { return stash(mb.id).loss; }

    duplex::Tensor backward_input(const duplex::Microbatch& mb, const duplex::TensorView& grad_output) override {
        Stash& st = stash(mb.id);
        std::vector<double> dy = info_.stage == info_.num_stages - 1 ? st.dout : values(grad_output);
        for (size_t l = layers_.size(); l-- > 0;) {
            const Layer& L = layers_[l];
            std::vector<double> dz(dy.size()), dx(dy.size(), 0.0);
            for (size_t i = 0; i < dy.size(); ++i) dz[i] = dy[i] * (1 - st.y[l][i] * st.y[l][i]);
            for (int r = 0; r < c_.rows; ++r)
                for (int i = 0; i < c_.width; ++i)
                    for (int j = 0; j < c_.width; ++j)
                        dx[size_t(r) * c_.width + i] += dz[size_t(r) * c_.width + j] * L.w[size_t(i) * c_.width + j];
            st.dz.push_back(std::move(dz));  // kept for W, in reverse layer order
            dy = std::move(dx);
        }
        if (info_.stage == 0) return {};
        return duplex::Tensor::from_vector(std::move(dy), {c_.rows, c_.width});
    }
    void backward_weight(const duplex::Microbatch& mb) override {
        Stash& st = stash(mb.id);
        for (size_t l = 0; l < layers_.size(); ++l) {
            Layer& L = layers_[l];
            const std::vector<double>& x = st.x[l];
            const std::vector<double>& dz = st.dz[layers_.size() - 1 - l];
            for (int r = 0; r < c_.rows; ++r)
                for (int j = 0; j < c_.width; ++j) {
                    double g = dz[size_t(r) * c_.width + j];
                    L.db[j] += g;
                    for (int i = 0; i < c_.width; ++i) L.dw[size_t(i) * c_.width + j] += x[size_t(r) * c_.width + i] * g;
                }
        }
        std::lock_guard<std::mutex> lock(mutex_);
        stash_.erase(mb.id);
    }
    std::vector<duplex::StateBuffer> state() override {
        std::vector<duplex::StateBuffer> out;
        for (Layer& L : layers_) {
            std::string p = "layer" + std::to_string(L.index);
            out.push_back({p + ".w", duplex::StateKind::Parameter, duplex::TensorView::of(L.w, {c_.width, c_.width}),
                           duplex::TensorView::of(L.dw, {c_.width, c_.width}), false, true});
            out.push_back({p + ".b", duplex::StateKind::Parameter, duplex::TensorView::of(L.b),
                           duplex::TensorView::of(L.db), false, false});
        }
        return out;
    }

private:
    struct Layer {
        int index = 0;
        std::vector<double> w, b, dw, db;
    };
    struct Stash {
        std::vector<std::vector<double>> x, y, dz;
        std::vector<double> dout;
        double loss = 0;
    };
    std::vector<double> inputs(const duplex::Microbatch& mb) const {
        std::vector<double> x(size_t(c_.rows) * c_.width);
        for (size_t i = 0; i < x.size(); ++i) x[i] = hash_unit(c_.seed + 1, uint64_t(mb.step) * 100003 + mb.global, i);
        return x;
    }
    std::vector<double> targets(const duplex::Microbatch& mb) const {
        std::vector<double> x = inputs(mb), t(x.size());
        for (int r = 0; r < c_.rows; ++r)
            for (int j = 0; j < c_.width; ++j)
                t[size_t(r) * c_.width + j] = 0.5 * std::sin(3 * x[size_t(r) * c_.width + j] + x[size_t(r) * c_.width]);
        return t;
    }
    static std::vector<double> values(const duplex::TensorView& v) {
        const double* p = v.data<double>();
        return std::vector<double>(p, p + v.numel());
    }
    Stash& stash(int mb) {  // the two halves of an F&B pair touch different microbatches concurrently
        std::lock_guard<std::mutex> lock(mutex_);
        return stash_[mb];
    }
    Config c_;
    duplex::StageInfo info_;
    std::vector<Layer> layers_;
    std::mutex mutex_;
    std::map<int, Stash> stash_;
};

}  // namespace mlp
