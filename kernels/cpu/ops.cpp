#include "kernels/cpu/ops.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "core/dtype.hpp"
#include "core/error.hpp"

extern "C" void openblas_set_num_threads(int num_threads);

namespace duplex::kernels {

void blas_single_threaded() { openblas_set_num_threads(1); }

namespace {
thread_local std::vector<GemmShape>* g_gemm_sink = nullptr;
}
void gemm_record(std::vector<GemmShape>* sink) { g_gemm_sink = sink; }

template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, const T* B, T beta, T* C) {
    if (M == 0 || N == 0) return;
    if (g_gemm_sink) g_gemm_sink->push_back({ta, tb, M, N, K});
    const CBLAS_TRANSPOSE opa = ta ? CblasTrans : CblasNoTrans, opb = tb ? CblasTrans : CblasNoTrans;
    if constexpr (sizeof(T) == 4) {
        cblas_sgemm(CblasRowMajor, opa, opb, M, N, K, alpha, A, ta ? M : K, B, tb ? K : N, beta, C, N);
    } else {
        cblas_dgemm(CblasRowMajor, opa, opb, M, N, K, alpha, A, ta ? M : K, B, tb ? K : N, beta, C, N);
    }
}

template void gemm<float>(bool, bool, int, int, int, float, const float*, const float*, float, float*);
template void gemm<double>(bool, bool, int, int, int, double, const double*, const double*, double, double*);

template <typename T>
void rmsnorm_forward(const T* x, const T* g, int rows, int cols, T eps, T* y, T* rstd) {
    for (int r = 0; r < rows; ++r) {
        const T* xr = x + size_t(r) * cols;
        double ss = 0;
        for (int c = 0; c < cols; ++c) ss += double(xr[c]) * xr[c];
        T inv = T(1.0 / std::sqrt(ss / cols + double(eps)));
        rstd[r] = inv;
        T* yr = y + size_t(r) * cols;
        for (int c = 0; c < cols; ++c) yr[c] = xr[c] * inv * g[c];
    }
}

template <typename T>
void rmsnorm_backward_input(const T* dy, const T* x, const T* g, const T* rstd, int rows, int cols, T* dx) {
    for (int r = 0; r < rows; ++r) {
        const T* xr = x + size_t(r) * cols;
        const T* dyr = dy + size_t(r) * cols;
        double dot = 0;
        for (int c = 0; c < cols; ++c) dot += double(dyr[c]) * g[c] * xr[c];
        T inv = rstd[r];
        T coef = T(dot / cols) * inv * inv * inv;
        T* dxr = dx + size_t(r) * cols;
        for (int c = 0; c < cols; ++c) dxr[c] = dyr[c] * g[c] * inv - xr[c] * coef;
    }
}

template <typename T>
void rmsnorm_backward_weight(const T* dy, const T* x, const T* rstd, int rows, int cols, T* dg) {
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) dg[c] += dy[size_t(r) * cols + c] * x[size_t(r) * cols + c] * rstd[r];
}

template <typename T>
void rope(T* x, const int* pos, int tokens, int heads, int head_dim, double base, bool inverse) {
    int half = head_dim / 2;
    std::vector<double> freq(half);
    for (int i = 0; i < half; ++i) freq[i] = std::pow(base, -2.0 * i / head_dim);
    for (int t = 0; t < tokens; ++t) {
        for (int i = 0; i < half; ++i) {
            double angle = pos[t] * freq[i];
            T c = T(std::cos(angle)), s = T(inverse ? -std::sin(angle) : std::sin(angle));
            for (int h = 0; h < heads; ++h) {
                T* p = x + (size_t(t) * heads + h) * head_dim + 2 * i;
                T a = p[0], b = p[1];
                p[0] = a * c - b * s;
                p[1] = a * s + b * c;
            }
        }
    }
}

template <typename T>
void attention_forward(const T* q, const T* k, const T* v, int B, int S, int H, int D, T* out, T* probs) {
    const T scale = T(1.0 / std::sqrt(double(D)));
    const size_t row = size_t(H) * D;
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < H; ++h) {
            T* P = probs + (size_t(b) * H + h) * S * S;
            for (int i = 0; i < S; ++i) {
                const T* qi = q + (size_t(b) * S + i) * row + size_t(h) * D;
                T* Pi = P + size_t(i) * S;
                T mx = -INFINITY;
                for (int j = 0; j <= i; ++j) {
                    const T* kj = k + (size_t(b) * S + j) * row + size_t(h) * D;
                    T dot = 0;
                    for (int d = 0; d < D; ++d) dot += qi[d] * kj[d];
                    Pi[j] = dot * scale;
                    mx = std::max(mx, Pi[j]);
                }
                T sum = 0;
                for (int j = 0; j <= i; ++j) sum += (Pi[j] = std::exp(Pi[j] - mx));
                for (int j = 0; j <= i; ++j) Pi[j] /= sum;
                for (int j = i + 1; j < S; ++j) Pi[j] = 0;
                T* oi = out + (size_t(b) * S + i) * row + size_t(h) * D;
                for (int d = 0; d < D; ++d) oi[d] = 0;
                for (int j = 0; j <= i; ++j) {
                    const T* vj = v + (size_t(b) * S + j) * row + size_t(h) * D;
                    for (int d = 0; d < D; ++d) oi[d] += Pi[j] * vj[d];
                }
            }
        }
    }
}

template <typename T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* probs, int B, int S, int H, int D,
                        T* dq, T* dk, T* dv) {
    const T scale = T(1.0 / std::sqrt(double(D)));
    const size_t row = size_t(H) * D;
    const size_t n = size_t(B) * S * row;
    std::fill(dq, dq + n, T(0));
    std::fill(dk, dk + n, T(0));
    std::fill(dv, dv + n, T(0));
    std::vector<T> dP(S);
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < H; ++h) {
            const T* P = probs + (size_t(b) * H + h) * S * S;
            for (int i = 0; i < S; ++i) {
                const T* Pi = P + size_t(i) * S;
                const size_t oi = (size_t(b) * S + i) * row + size_t(h) * D;
                T dot = 0;
                for (int j = 0; j <= i; ++j) {
                    const size_t oj = (size_t(b) * S + j) * row + size_t(h) * D;
                    T s = 0;
                    for (int d = 0; d < D; ++d) {
                        s += dout[oi + d] * v[oj + d];
                        dv[oj + d] += Pi[j] * dout[oi + d];
                    }
                    dP[j] = s;
                    dot += Pi[j] * s;
                }
                for (int j = 0; j <= i; ++j) {
                    const size_t oj = (size_t(b) * S + j) * row + size_t(h) * D;
                    T ds = Pi[j] * (dP[j] - dot) * scale;
                    for (int d = 0; d < D; ++d) {
                        dq[oi + d] += ds * k[oj + d];
                        dk[oj + d] += ds * q[oi + d];
                    }
                }
            }
        }
    }
}

template <typename T>
void swiglu_forward(const T* a, const T* b, size_t n, T* h) {
    for (size_t i = 0; i < n; ++i) {
        T s = T(1) / (T(1) + std::exp(-a[i]));
        h[i] = a[i] * s * b[i];
    }
}

template <typename T>
void swiglu_backward(const T* dh, const T* a, const T* b, size_t n, T* da, T* db) {
    for (size_t i = 0; i < n; ++i) {
        T s = T(1) / (T(1) + std::exp(-a[i]));
        da[i] = dh[i] * b[i] * s * (T(1) + a[i] * (T(1) - s));
        db[i] = dh[i] * a[i] * s;
    }
}

template <typename T>
double softmax_cross_entropy(const T* logits, const int* targets, int rows, int vocab, T* dlogits, double scale) {
    double total = 0;
    for (int r = 0; r < rows; ++r) {
        const T* z = logits + size_t(r) * vocab;
        if (targets[r] < 0 || targets[r] >= vocab)
            throw ConfigError("target", fmt::format("token {} outside the vocabulary of {}", targets[r], vocab));
        double mx = -INFINITY;
        for (int c = 0; c < vocab; ++c) mx = std::max(mx, double(z[c]));
        double sum = 0;
        for (int c = 0; c < vocab; ++c) sum += std::exp(double(z[c]) - mx);
        double lse = mx + std::log(sum);
        total += lse - double(z[targets[r]]);
        if (dlogits) {
            T* d = dlogits + size_t(r) * vocab;
            for (int c = 0; c < vocab; ++c) d[c] = T(std::exp(double(z[c]) - lse) * scale / rows);
            d[targets[r]] -= T(scale / rows);
        }
    }
    return total / rows;
}

template <typename T>
void embedding_forward(const T* table, const int* ids, int tokens, int dim, T* out) {
    for (int t = 0; t < tokens; ++t) std::memcpy(out + size_t(t) * dim, table + size_t(ids[t]) * dim, sizeof(T) * dim);
}

template <typename T>
void embedding_backward_weight(const T* dout, const int* ids, int tokens, int dim, T* dtable) {
    for (int t = 0; t < tokens; ++t)
        for (int c = 0; c < dim; ++c) dtable[size_t(ids[t]) * dim + c] += dout[size_t(t) * dim + c];
}

template <typename T>
void adamw_step(T* p, const T* g, T* m, T* v, size_t n, const AdamWConfig& c, long step) {
    const double bc1 = 1 - std::pow(c.beta1, double(step)), bc2 = 1 - std::pow(c.beta2, double(step));
    for (size_t i = 0; i < n; ++i) {
        m[i] = T(c.beta1 * m[i] + (1 - c.beta1) * g[i]);
        v[i] = T(c.beta2 * v[i] + (1 - c.beta2) * double(g[i]) * g[i]);
        double update = (m[i] / bc1) / (std::sqrt(v[i] / bc2) + c.eps) + c.weight_decay * p[i];
        p[i] = T(p[i] - c.lr * update);
    }
}

template <typename T>
double sum_squares(const T* x, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += double(x[i]) * x[i];
    return s;
}

template <typename T>
void ema_update(T* ema, const T* param, size_t n, double decay) {
    for (size_t i = 0; i < n; ++i) ema[i] = T(decay * ema[i] + (1 - decay) * param[i]);
}

namespace {
void check_fp8_dims(int rows, int cols, bool weights) {
    DUPLEX_CHECK_ARG(cols % 128 == 0, "fp8 quantize", "columns ({}) must be a multiple of 128", cols);
    if (weights) DUPLEX_CHECK_ARG(rows % 128 == 0, "fp8 quantize", "weight rows ({}) must be a multiple of 128", rows);
}
float tile_scale(float amax) { return amax > 0 ? amax / kE4M3Max : 1.0f; }
}  // namespace

void quantize_fp8_1x128(const float* x, int rows, int cols, uint8_t* q, float* scales) {
    check_fp8_dims(rows, cols, false);
    int tiles = cols / 128;
    for (int r = 0; r < rows; ++r) {
        for (int t = 0; t < tiles; ++t) {
            const float* src = x + size_t(r) * cols + size_t(t) * 128;
            float amax = 0;
            for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(src[i]));
            float s = tile_scale(amax);
            scales[size_t(r) * tiles + t] = s;
            for (int i = 0; i < 128; ++i) q[size_t(r) * cols + size_t(t) * 128 + i] = fp32_to_e4m3(src[i] / s);
        }
    }
}

void dequantize_fp8_1x128(const uint8_t* q, const float* scales, int rows, int cols, float* x) {
    check_fp8_dims(rows, cols, false);
    int tiles = cols / 128;
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c)
            x[size_t(r) * cols + c] = e4m3_to_fp32(q[size_t(r) * cols + c]) * scales[size_t(r) * tiles + c / 128];
}

void quantize_fp8_128x128(const float* w, int rows, int cols, uint8_t* q, float* scales) {
    check_fp8_dims(rows, cols, true);
    int bc = cols / 128;
    for (int br = 0; br < rows / 128; ++br) {
        for (int b = 0; b < bc; ++b) {
            float amax = 0;
            for (int r = 0; r < 128; ++r)
                for (int c = 0; c < 128; ++c)
                    amax = std::max(amax, std::fabs(w[size_t(br * 128 + r) * cols + b * 128 + c]));
            float s = tile_scale(amax);
            scales[size_t(br) * bc + b] = s;
            for (int r = 0; r < 128; ++r)
                for (int c = 0; c < 128; ++c) {
                    size_t i = size_t(br * 128 + r) * cols + b * 128 + c;
                    q[i] = fp32_to_e4m3(w[i] / s);
                }
        }
    }
}

void dequantize_fp8_128x128(const uint8_t* q, const float* scales, int rows, int cols, float* w) {
    check_fp8_dims(rows, cols, true);
    int bc = cols / 128;
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c)
            w[size_t(r) * cols + c] = e4m3_to_fp32(q[size_t(r) * cols + c]) * scales[size_t(r / 128) * bc + c / 128];
}

#define DUPLEX_INSTANTIATE(T)                                                                                      \
    template void rmsnorm_forward<T>(const T*, const T*, int, int, T, T*, T*);                                     \
    template void rmsnorm_backward_input<T>(const T*, const T*, const T*, const T*, int, int, T*);                 \
    template void rmsnorm_backward_weight<T>(const T*, const T*, const T*, int, int, T*);                          \
    template void rope<T>(T*, const int*, int, int, int, double, bool);                                            \
    template void attention_forward<T>(const T*, const T*, const T*, int, int, int, int, T*, T*);                  \
    template void attention_backward<T>(const T*, const T*, const T*, const T*, const T*, int, int, int, int, T*, \
                                        T*, T*);                                                                   \
    template void swiglu_forward<T>(const T*, const T*, size_t, T*);                                               \
    template void swiglu_backward<T>(const T*, const T*, const T*, size_t, T*, T*);                                \
    template double softmax_cross_entropy<T>(const T*, const int*, int, int, T*, double);                          \
    template void embedding_forward<T>(const T*, const int*, int, int, T*);                                        \
    template void embedding_backward_weight<T>(const T*, const int*, int, int, T*);                                \
    template void adamw_step<T>(T*, const T*, T*, T*, size_t, const AdamWConfig&, long);                           \
    template double sum_squares<T>(const T*, size_t);                                                              \
    template void ema_update<T>(T*, const T*, size_t, double);

DUPLEX_INSTANTIATE(float)
DUPLEX_INSTANTIATE(double)

}  // namespace duplex::kernels
