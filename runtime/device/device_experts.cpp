#include "runtime/device/device_experts.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

#ifdef DUPLEX_HAVE_CUDA
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

#include "core/cuda_check.hpp"
#include "kernels/cuda/buffer.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
#include "runtime/device/device_rows.hpp"
#endif

namespace duplex {

#ifdef DUPLEX_HAVE_CUDA
namespace {

using DevFloats = cuda::DeviceArray<float>;

// The calling thread's own stream: the two threads of an F&B pair overlap on the device.
const cudaStream_t kStream = cudaStreamPerThread;

void upload(float* to, const float* from, size_t n) {
    if (n) DUPLEX_CUDA_CHECK(cudaMemcpyAsync(to, from, n * sizeof(float), cudaMemcpyHostToDevice, kStream));
}
void download(float* to, const float* from, size_t n) {
    if (n) DUPLEX_CUDA_CHECK(cudaMemcpyAsync(to, from, n * sizeof(float), cudaMemcpyDeviceToHost, kStream));
}

class DeviceExperts : public ExpertCompute<float> {
public:
    explicit DeviceExperts(int device) : device_(device) {}
    std::string name() const override { return fmt::format("cuda:{}", device_); }

    // One layer's local experts' weights on the device, [experts][d x f], [experts][d x f], [experts][f x d]:
    // uploaded at the layer's first forward after weights_changed(), then shared by its microbatches.
    struct LayerWeights {
        DevFloats w1, w3, w2;
    };

    // What one (layer, microbatch) keeps on the device: rows are experts' rows back to back.
    struct Stash {
        int experts = 0, d = 0, f = 0;
        std::vector<size_t> first;  // per expert: its first row; first[experts] = all rows
        std::shared_ptr<const LayerWeights> w;  // this step's weights (kept alive by the stash until backward)
        std::shared_ptr<ResidentRows> x;        // forward: input rows (where the exchange left them, or uploaded)
        DevFloats a1, a3;                       // forward: the two projections
        std::shared_ptr<ResidentRows> dout;     // backward: output gradients, kept for the W pass
        DevFloats s, da1, da3;
        size_t rows(int e) const { return first[e + 1] - first[e]; }
    };

    bool reads_rows_on(int where) const override { return where == device_; }

    // Host rows: uploaded expert-major, the resident forward, the outputs downloaded.
    void forward(uint64_t key, const Weights& w, const std::vector<std::vector<float>>& rows,
                 std::vector<std::vector<float>>& out) override {
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        const int E = int(w.w1.size()), d = E ? int(w.w1[0]->shape[0]) : 0;
        DUPLEX_CHECK_ARG(int(rows.size()) == E, "device experts", "{} row blocks for {} experts", rows.size(), E);
        std::vector<int64_t> first(E + 1, 0);
        for (int e = 0; e < E; ++e) {
            DUPLEX_CHECK_ARG(rows[e].size() % size_t(d) == 0, "device experts", "expert {}: {} values are not rows of {}",
                             e, rows[e].size(), d);
            first[e + 1] = first[e] + int64_t(rows[e].size() / d);
        }
        auto x = std::make_shared<DeviceRows>(first, d, device_);
        for (int e = 0; e < E; ++e) upload(x->row(first[e]), rows[e].data(), rows[e].size());
        auto y = forward_resident(key, w, x);  // same stream: after the upload
        out.assign(E, {});
        for (int e = 0; e < E; ++e) {
            out[e].resize(size_t(y->rows(e)) * d);
            download(out[e].data(), static_cast<const DeviceRows&>(*y).row(first[e]), out[e].size());
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(kStream));
    }

    std::shared_ptr<ResidentRows> forward_resident(uint64_t key, const Weights& w,
                                                   std::shared_ptr<ResidentRows> rows) override {
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        auto st = std::make_shared<Stash>();
        const int E = int(w.w1.size());
        DUPLEX_CHECK_ARG(int(rows->first.size()) == E + 1 && int(w.w3.size()) == E && int(w.w2.size()) == E,
                         "device experts", "{} row blocks for {} experts", rows->first.size() - 1, E);
        st->experts = E;
        st->d = E ? int(w.w1[0]->shape[0]) : 0;
        st->f = E ? int(w.w1[0]->shape[1]) : 0;
        const int d = st->d, f = st->f;
        const float* x = device_rows_of(*rows, device_, d, "device experts");
        st->first.assign(rows->first.begin(), rows->first.end());
        const size_t n = st->first[E], per = size_t(d) * f;
        st->w = weights_of(w, per);
        st->x = std::move(rows);
        const LayerWeights& lw = *st->w;
        st->a1 = DevFloats(n * f), st->a3 = DevFloats(n * f);
        DevFloats s(n * f);
        auto y = std::make_shared<DeviceRows>(st->x->first, d, device_);
        for (int e = 0; e < E; ++e) {
            int r = int(st->rows(e));
            if (r == 0) continue;
            size_t at = st->first[e];
            cuda::gemm_f32(false, false, r, f, d, 1, x + at * d, lw.w1.at(per * e), 0, st->a1.at(at * f), kStream);
            cuda::gemm_f32(false, false, r, f, d, 1, x + at * d, lw.w3.at(per * e), 0, st->a3.at(at * f), kStream);
        }
        cuda::swiglu_forward(st->a1.get(), st->a3.get(), n * f, s.get(), kStream);
        for (int e = 0; e < E; ++e) {
            int r = int(st->rows(e));
            if (r == 0) continue;
            size_t at = st->first[e];
            cuda::gemm_f32(false, false, r, d, f, 1, s.at(at * f), lw.w2.at(per * e), 0, y->row(int64_t(at)), kStream);
        }
        // The exchange reads y on its own stream: complete before it is handed over.
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(kStream));
        std::lock_guard<std::mutex> lock(mutex_);
        DUPLEX_CHECK_ARG(stash_.emplace(key, std::move(st)).second, "device experts", "forward of key {:#x} twice", key);
        return y;
    }

    // Host gradients: uploaded expert-major, the resident backward, the input gradients downloaded.
    std::function<void()> backward(uint64_t key, const Weights& w, const std::vector<std::vector<float>>& d_out,
                                   std::vector<std::vector<float>>& d_rows) override {
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        std::vector<int64_t> first = first_rows_of(key);
        const int E = int(first.size()) - 1, d = E ? int(w.w1[0]->shape[0]) : 0;
        DUPLEX_CHECK_ARG(int(d_out.size()) == E, "device experts", "{} gradient blocks for {} experts", d_out.size(), E);
        auto g = std::make_shared<DeviceRows>(first, d, device_);
        for (int e = 0; e < E; ++e) {
            DUPLEX_CHECK_ARG(int64_t(d_out[e].size()) == (first[e + 1] - first[e]) * d, "device experts",
                             "expert {}: {} gradient values for {} rows", e, d_out[e].size(), first[e + 1] - first[e]);
            upload(g->row(first[e]), d_out[e].data(), d_out[e].size());
        }
        std::shared_ptr<ResidentRows> dx;
        auto work = backward_resident(key, w, g, dx);  // same stream: after the upload
        d_rows.assign(E, {});
        for (int e = 0; e < E; ++e) {
            d_rows[e].resize(size_t(dx->rows(e)) * d);
            download(d_rows[e].data(), static_cast<const DeviceRows&>(*dx).row(first[e]), d_rows[e].size());
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(kStream));
        return work;
    }

    std::function<void()> backward_resident(uint64_t key, const Weights& w, std::shared_ptr<ResidentRows> d_out,
                                            std::shared_ptr<ResidentRows>& d_rows) override {
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        std::shared_ptr<Stash> st;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto it = stash_.find(key);
            if (it == stash_.end()) throw Error(fmt::format("device experts: backward of key {:#x} without its forward", key));
            st = std::move(it->second);
            stash_.erase(it);
        }
        const int E = st->experts, d = st->d, f = st->f;
        const size_t n = st->first[E], per = size_t(d) * f;
        DUPLEX_CHECK_ARG(d_out->first == st->x->first, "device experts",
                         "output gradients of {} rows for the {} rows of the forward", d_out->first.back(), n);
        const float* dout = device_rows_of(*d_out, device_, d, "device experts");
        st->dout = std::move(d_out);
        st->s = DevFloats(n * f), st->da1 = DevFloats(n * f), st->da3 = DevFloats(n * f);
        DevFloats ds(n * f);
        auto dx = std::make_shared<DeviceRows>(st->x->first, d, device_);
        cuda::swiglu_forward(st->a1.get(), st->a3.get(), n * f, st->s.get(), kStream);  // recomputed
        for (int e = 0; e < E; ++e) {
            int r = int(st->rows(e));
            if (r == 0) continue;
            size_t at = st->first[e];
            cuda::gemm_f32(false, true, r, f, d, 1, dout + at * d, st->w->w2.at(per * e), 0, ds.at(at * f), kStream);
        }
        cuda::swiglu_backward(ds.get(), st->a1.get(), st->a3.get(), n * f, st->da1.get(), st->da3.get(), kStream);
        for (int e = 0; e < E; ++e) {
            int r = int(st->rows(e));
            if (r == 0) continue;
            size_t at = st->first[e];
            cuda::gemm_f32(false, true, r, d, f, 1, st->da1.at(at * f), st->w->w1.at(per * e), 0, dx->row(int64_t(at)),
                           kStream);
            cuda::gemm_f32(false, true, r, d, f, 1, st->da3.at(at * f), st->w->w3.at(per * e), 1, dx->row(int64_t(at)),
                           kStream);
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(kStream));
        d_rows = dx;
        st->w.reset();  // W needs no weights
        int device = device_;
        Weights params = w;
        return [st, params, device] {
            DUPLEX_CUDA_CHECK(cudaSetDevice(device));
            const int E = st->experts, d = st->d, f = st->f;
            const size_t per = size_t(d) * f;
            const float* x = static_cast<const float*>(st->x->data);
            const float* dout = static_cast<const float*>(st->dout->data);
            // Per expert: its three gradients computed, downloaded, and one wait (memory of one expert's three).
            DevFloats g(3 * per);
            std::vector<float> host(3 * per);
            for (int e = 0; e < E; ++e) {
                int r = int(st->rows(e));
                if (r == 0) continue;
                size_t at = st->first[e];
                // dW1 = x^T da1, dW3 = x^T da3 [d x f]; dW2 = s^T dout [f x d]
                cuda::gemm_f32(true, false, d, f, r, 1, x + at * d, st->da1.at(at * f), 0, g.at(0), kStream);
                cuda::gemm_f32(true, false, d, f, r, 1, x + at * d, st->da3.at(at * f), 0, g.at(per), kStream);
                cuda::gemm_f32(true, false, f, d, r, 1, st->s.at(at * f), dout + at * d, 0, g.at(2 * per), kStream);
                download(host.data(), g.get(), 3 * per);
                DUPLEX_CUDA_CHECK(cudaStreamSynchronize(kStream));
                Param<float>* targets[3] = {params.w1[e], params.w3[e], params.w2[e]};
                for (int j = 0; j < 3; ++j)
                    for (size_t i = 0; i < per; ++i) targets[j]->grad[i] += host[j * per + i];
            }
        };
    }

    void weights_changed() override {
        std::lock_guard<std::mutex> lock(weights_mutex_);
        weights_.clear();  // stashes still in flight keep theirs
    }

private:
    // The rows per expert of a forward waiting for its backward.
    std::vector<int64_t> first_rows_of(uint64_t key) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = stash_.find(key);
        if (it == stash_.end()) throw Error(fmt::format("device experts: backward of key {:#x} without its forward", key));
        return it->second->x->first;
    }

    // The device copy of a layer's weights (the layer named by its first expert's W1), uploaded on first use.
    std::shared_ptr<const LayerWeights> weights_of(const Weights& w, size_t per) {
        const int E = int(w.w1.size());
        std::lock_guard<std::mutex> lock(weights_mutex_);
        auto& slot = weights_[E ? static_cast<const void*>(w.w1[0]) : nullptr];
        if (!slot) {
            auto lw = std::make_shared<LayerWeights>();
            lw->w1 = DevFloats(per * E), lw->w3 = DevFloats(per * E), lw->w2 = DevFloats(per * E);
            for (int e = 0; e < E; ++e) {
                upload(lw->w1.at(per * e), w.w1[e]->value.data(), per);
                upload(lw->w3.at(per * e), w.w3[e]->value.data(), per);
                upload(lw->w2.at(per * e), w.w2[e]->value.data(), per);
            }
            // The other thread of an F&B pair reads them on its own stream: complete before anyone does.
            DUPLEX_CUDA_CHECK(cudaStreamSynchronize(kStream));
            slot = std::move(lw);
        }
        return slot;
    }

    int device_;
    std::mutex mutex_;
    std::unordered_map<uint64_t, std::shared_ptr<Stash>> stash_;
    std::mutex weights_mutex_;
    std::unordered_map<const void*, std::shared_ptr<const LayerWeights>> weights_;
};

}  // namespace

bool device_experts_available() { return !cuda_devices().empty(); }
int cuda_device_count() { return int(cuda_devices().size()); }

std::shared_ptr<ExpertCompute<float>> make_device_experts(int device) {
    auto devices = cuda_devices();
    if (devices.empty()) throw ConfigError("--experts-on", "cuda: no CUDA device on this machine");
    DUPLEX_CHECK_ARG(device >= 0 && device < int(devices.size()), "--experts-on", "cuda:{} requested, this machine has {}",
                     device, devices.size());
    return std::make_shared<DeviceExperts>(device);
}

#else

bool device_experts_available() { return false; }
int cuda_device_count() { return 0; }

std::shared_ptr<ExpertCompute<float>> make_device_experts(int) {
    throw ConfigError("--experts-on", "cuda is not built into this binary (no nvcc at configure time)");
}

#endif

template <>
void attach_device_experts<float>(ModelStage<float>& stage, int device) {
    if (device >= 0) stage.set_expert_compute(make_device_experts(device));
}

template <>
void attach_device_experts<double>(ModelStage<double>&, int device) {
    if (device >= 0) throw ConfigError("--experts-on", "the CUDA path runs fp32; drop --fp64 or use --experts-on cpu");
}

}  // namespace duplex
