// Expert GEMMs through cuBLAS: BF16 inputs, fp32 accumulation and output. The CPU reference is kernels::gemm on
// the same BF16 values widened to fp32 (tests/cuda/kernels_test.cpp).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"

#define DUPLEX_CUBLAS_CHECK(call)                                                                          \
    do {                                                                                                   \
        cublasStatus_t duplex_cublas_rc_ = (call);                                                         \
        if (duplex_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                                    \
            ::duplex::throw_api_error("cuBLAS", #call, duplex_cublas_rc_,                                  \
                                      cublasGetStatusString(duplex_cublas_rc_), __FILE__, __LINE__);       \
    } while (0)

namespace duplex::cuda {

namespace {
// One handle per thread (cuBLAS handles are not to be shared across threads without care).
cublasHandle_t handle() {
    thread_local cublasHandle_t h = [] {
        cublasHandle_t made = nullptr;
        DUPLEX_CUBLAS_CHECK(cublasCreate(&made));
        return made;
    }();
    return h;
}
}  // namespace

namespace {
// Whether this cuBLAS runs BF16-in / fp32-out grouped GEMMs: -1 not yet known, 1 yes, 0 no (NOT_SUPPORTED once).
std::atomic<int> grouped_supported{-1};
}  // namespace

GemmPath expert_gemm_bf16(const std::vector<const uint16_t*>& a, const std::vector<const uint16_t*>& b,
                          const std::vector<float*>& c, const std::vector<int>& rows, int k, int n, cudaStream_t stream) {
    size_t experts = rows.size();
    DUPLEX_CHECK_ARG(a.size() == experts && b.size() == experts && c.size() == experts, "expert gemm",
                     "{} A, {} B, {} C matrices for {} experts", a.size(), b.size(), c.size(), experts);
    DUPLEX_CHECK_ARG(k >= 1 && n >= 1, "expert gemm", "bad inner/outer sizes k {} n {}", k, n);
    for (size_t e = 0; e < experts; ++e)
        DUPLEX_CHECK_ARG(rows[e] >= 0, "expert gemm", "expert {} has {} rows", e, rows[e]);
    cublasHandle_t h = handle();
    DUPLEX_CUBLAS_CHECK(cublasSetStream(h, stream));
    DUPLEX_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    const float one = 1.0f, zero = 0.0f;
    // Row-major C[m x n] = A[m x k] B[k x n] is column-major C^T[n x m] = B^T[n x k] A^T[k x m].
    // One grouped call: a group per expert with rows (its own m), one problem each.
    std::vector<int> m_arr, n_arr, k_arr, lda, ldb, ldc, sizes;
    std::vector<const void*> ptrs;  // B's, then A's, then C's (as const void*)
    std::vector<float> alpha, beta;
    std::vector<cublasOperation_t> op;
    std::vector<size_t> used;
    for (size_t e = 0; e < experts; ++e)
        if (rows[e] > 0) used.push_back(e);
    if (used.empty()) return GemmPath::Grouped;
    if (grouped_supported.load() != 0) {
        const int groups = int(used.size());
        for (size_t e : used) {
            m_arr.push_back(n), n_arr.push_back(rows[e]), k_arr.push_back(k);
            lda.push_back(n), ldb.push_back(k), ldc.push_back(n), sizes.push_back(1);
            alpha.push_back(one), beta.push_back(zero), op.push_back(CUBLAS_OP_N);
        }
        for (size_t e : used) ptrs.push_back(b[e]);
        for (size_t e : used) ptrs.push_back(a[e]);
        for (size_t e : used) ptrs.push_back(c[e]);
        // The pointer arrays live on the device, stream-ordered so the call does not synchronize the device.
        void** d_ptrs = nullptr;
        DUPLEX_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&d_ptrs), ptrs.size() * sizeof(void*), stream));
        cublasStatus_t rc = CUBLAS_STATUS_SUCCESS;
        cudaError_t up = cudaMemcpyAsync(d_ptrs, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, stream);
        if (up == cudaSuccess)
            rc = cublasGemmGroupedBatchedEx(h, op.data(), op.data(), m_arr.data(), n_arr.data(), k_arr.data(),
                                            alpha.data(), d_ptrs, CUDA_R_16BF, lda.data(), d_ptrs + groups, CUDA_R_16BF,
                                            ldb.data(), beta.data(), d_ptrs + 2 * groups, CUDA_R_32F, ldc.data(),
                                            groups, sizes.data(), CUBLAS_COMPUTE_32F);
        // The host arrays must outlive the enqueue only; the device one is freed in stream order.
        cudaFreeAsync(d_ptrs, stream);
        DUPLEX_CUDA_CHECK(up);
        if (rc == CUBLAS_STATUS_SUCCESS) {
            grouped_supported.store(1);
            return GemmPath::Grouped;
        }
        if (rc != CUBLAS_STATUS_NOT_SUPPORTED) DUPLEX_CUBLAS_CHECK(rc);
        grouped_supported.store(0);  // this cuBLAS has no BF16 -> fp32 grouped GEMM: one call per expert
    }
    for (size_t e : used)
        DUPLEX_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, rows[e], k, &one, b[e], CUDA_R_16BF, n, a[e],
                                         CUDA_R_16BF, k, &zero, c[e], CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
    return GemmPath::PerExpert;
}

namespace {
// This thread's handle on `stream` in `math` mode, or null for an empty product (after checking the sizes).
cublasHandle_t handle_for(int m, int n, int k, cudaStream_t stream, cublasMath_t math) {
    DUPLEX_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "gemm", "negative size {} x {} x {}", m, n, k);
    if (m == 0 || n == 0) return nullptr;
    cublasHandle_t h = handle();
    DUPLEX_CUBLAS_CHECK(cublasSetStream(h, stream));
    DUPLEX_CUBLAS_CHECK(cublasSetMathMode(h, math));
    return h;
}
}  // namespace

void gemm_f32(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c,
              cudaStream_t stream) {
    cublasHandle_t h = handle_for(m, n, k, stream, CUBLAS_PEDANTIC_MATH);
    if (!h) return;
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T; a row-major buffer read column-major is
    // its transpose, so B goes first, each with its own flag, and the leading dimensions are the row lengths.
    DUPLEX_CUBLAS_CHECK(cublasSgemm(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b,
                                    tb ? k : n, a, ta ? m : k, &beta, c, n));
}

void gemm_bf16(bool ta, bool tb, int m, int n, int k, float alpha, const uint16_t* a, const uint16_t* b, float beta,
               void* c, bool c_is_bf16, cudaStream_t stream) {
    cublasHandle_t h = handle_for(m, n, k, stream, CUBLAS_DEFAULT_MATH);
    if (!h) return;
    // Row-major as column-major, B first (see gemm_f32).
    DUPLEX_CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b,
                                     CUDA_R_16BF, tb ? k : n, a, CUDA_R_16BF, ta ? m : k, &beta, c,
                                     c_is_bf16 ? CUDA_R_16BF : CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace duplex::cuda
