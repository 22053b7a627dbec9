// CPU reference kernels: the math of the model on raw row-major arrays, in fp32 or fp64 (T = float or
// double). Every backward is split where the model needs it: *_backward_input is the B half (gradient of
// the input), *_backward_weight the W half (gradient of the weights, which may run later).
//
//   kernels::gemm(false, false, M, N, K, 1.0f, A, B, 0.0f, C);        // C[M,N] = A[M,K] B[K,N]
//   kernels::rmsnorm_forward(x, g, rows, cols, 1e-6f, y, rstd);
//
// Each CUDA kernel of kernels/cuda is tested against the function of the same name here.
#pragma once

#include <cstdint>
#include <cstddef>
#include <vector>

namespace duplex::kernels {

// Limits OpenBLAS to one thread per calling rank (ranks are threads or processes already).
void blas_single_threaded();

// Records the shape of every gemm call made on this thread while a sink is set (benchmarks replay them).
struct GemmShape {
    bool ta, tb;
    int M, N, K;
};
void gemm_record(std::vector<GemmShape>* sink);  // nullptr stops recording

// C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major, op = transpose when ta/tb.
template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, const T* B, T beta, T* C);

// y = x / rms(x) * g per row; rstd[r] = 1 / rms(row r) is kept for backward.
template <typename T>
void rmsnorm_forward(const T* x, const T* g, int rows, int cols, T eps, T* y, T* rstd);
template <typename T>
void rmsnorm_backward_input(const T* dy, const T* x, const T* g, const T* rstd, int rows, int cols, T* dx);
template <typename T>
void rmsnorm_backward_weight(const T* dy, const T* x, const T* rstd, int rows, int cols, T* dg);  // dg +=

// Rotary position embedding, in place, on x[tokens, heads, head_dim] (head_dim even); `pos` per token.
// inverse = true rotates the other way: the backward of the forward rotation.
template <typename T>
void rope(T* x, const int* pos, int tokens, int heads, int head_dim, double base, bool inverse);

// Causal multi-head attention over batch sequences of length S: q, k, v, out are [B*S, H, D];
// probs [B, H, S, S] keeps the softmax for backward.
template <typename T>
void attention_forward(const T* q, const T* k, const T* v, int B, int S, int H, int D, T* out, T* probs);
template <typename T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* probs, int B, int S, int H, int D,
                        T* dq, T* dk, T* dv);

// h = silu(a) * b elementwise, and its backward.
template <typename T>
void swiglu_forward(const T* a, const T* b, size_t n, T* h);
template <typename T>
void swiglu_backward(const T* dh, const T* a, const T* b, size_t n, T* da, T* db);

// Mean softmax cross-entropy over rows; dlogits (may be null) receives d(loss)/d(logits) * scale.
template <typename T>
double softmax_cross_entropy(const T* logits, const int* targets, int rows, int vocab, T* dlogits, double scale);

// out[t] = table[ids[t]]; backward accumulates rows into dtable.
template <typename T>
void embedding_forward(const T* table, const int* ids, int tokens, int dim, T* out);
template <typename T>
void embedding_backward_weight(const T* dout, const int* ids, int tokens, int dim, T* dtable);

struct AdamWConfig {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};
// One AdamW step (decoupled weight decay, bias-corrected) on n parameters at step `step` (1-based).
template <typename T>
void adamw_step(T* param, const T* grad, T* m, T* v, size_t n, const AdamWConfig& c, long step);
// Sum of squares (for clipping by the global norm).
template <typename T>
double sum_squares(const T* x, size_t n);
// ema = decay * ema + (1 - decay) * param
template <typename T>
void ema_update(T* ema, const T* param, size_t n, double decay);

// FP8-e4m3 fine-grained quantization with fp32 scales: activations in 1x128 tiles (scales[rows, cols/128]),
// weights in 128x128 blocks (scales[rows/128, cols/128]); cols (and rows for weights) must be multiples of
// 128 (ConfigError otherwise). scale = amax / 448, so every tile uses the full e4m3 range.
void quantize_fp8_1x128(const float* x, int rows, int cols, uint8_t* q, float* scales);
void dequantize_fp8_1x128(const uint8_t* q, const float* scales, int rows, int cols, float* x);
void quantize_fp8_128x128(const float* w, int rows, int cols, uint8_t* q, float* scales);
void dequantize_fp8_128x128(const uint8_t* q, const float* scales, int rows, int cols, float* w);

}  // namespace duplex::kernels
