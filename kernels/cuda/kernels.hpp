// The GPU kernels of the expert-parallel path. Host launchers with explicit arguments and a stream (pointers are
// device pointers unless named host_*); each one validates its arguments on the host and throws ConfigError
// before anything is launched. Every kernel has a CPU reference (kernels/cpu/) and a test comparing the two
// (tests/cuda/, ctest label `gpu`, skipped without a device).
//
//   FP8:      quantize_fp8_1x128 / dequantize_fp8_1x128 (activations), *_128x128 (weights) — bit-equal to the
//             CPU reference (same e4m3 conversion, IEEE division).
//   permute:  permute_rows / combine_rows — the dispatch layout of kernels/cpu/permute.hpp; combine multiplies
//             and adds without fusing, in slot order, so it is bit-equal to the CPU reference.
//   exchange: exchange_rows — the all-to-all of dispatch and combine between "virtual ranks", each row written once
//             (buffers on one device; the same code would address peers over NVLink), on a budget of SMs;
//             dispatch_rows_hierarchical / combine_rows_hierarchical — the node-limited dispatch and combine with
//             forwarder warps (one crossing per node; combine reduces inside the node before crossing).
//   GEMM:     expert_gemm_bf16 — per-expert [rows x k] x [k x n] products, one grouped cuBLAS call, BF16 in, fp32 out;
//             gemm_f32 and swiglu_* — the fp32 expert MLP of the executor's device path (runtime/device_experts).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/cpu/permute.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace duplex::cuda {

// ---- FP8 (e4m3, fp32 scales) ----
void quantize_fp8_1x128(const float* x, int rows, int cols, uint8_t* q, float* scales, cudaStream_t stream);
void dequantize_fp8_1x128(const uint8_t* q, const float* scales, int rows, int cols, float* x, cudaStream_t stream);
void quantize_fp8_128x128(const float* w, int rows, int cols, uint8_t* q, float* scales, cudaStream_t stream);
void dequantize_fp8_128x128(const uint8_t* q, const float* scales, int rows, int cols, float* w, cudaStream_t stream);

// ---- permute / combine ----
// A dispatch layout uploaded to the device (item_row only; the counts stay on the host).
class DeviceLayout {
public:
    explicit DeviceLayout(const kernels::DispatchLayout& layout);
    ~DeviceLayout();
    DeviceLayout(const DeviceLayout&) = delete;
    DeviceLayout& operator=(const DeviceLayout&) = delete;
    const int64_t* item_row() const { return item_row_; }
    int64_t num_items() const { return num_items_; }
    int64_t num_rows() const { return num_rows_; }

private:
    int64_t* item_row_ = nullptr;
    int64_t num_items_ = 0, num_rows_ = 0;
};

// send[item_row[i]] = x[src_row[i]]; src_row has layout.num_items() entries (device).
void permute_rows(const float* x, int dim, const int* src_row, const DeviceLayout& layout, float* send,
                  cudaStream_t stream);
// y[t] = sum_k gates[t, k] * recv[item_row[t * top_k + k]] (k in order, unfused), for a layout over slots.
void combine_rows(const float* recv, int dim, const DeviceLayout& layout, const float* gates, int tokens, int top_k,
                  float* y, cudaStream_t stream);

// Combine backward (kernels/cpu/permute.hpp): rows[item_row[s]] *= gates[s]; dots[s] = dy[t] . outputs[row of s]
// (columns in order, unfused — bit-equal to the CPU reference).
void gate_rows(float* rows, int dim, const DeviceLayout& layout, const float* gates, cudaStream_t stream);
void slot_dots(const float* dy, const float* outputs, int dim, const DeviceLayout& layout, int tokens, int top_k,
               float* dots, cudaStream_t stream);

// ---- exchange between virtual ranks ----
struct ExchangeConfig {
    int num_sms = 20;           // blocks of the kernel: the SMs it may occupy (DeepSeek-V3: 20 of 132)
    int rows_per_chunk = 4;     // rows per queue slot (node-limited kernels)
    int queue_chunks = 8;       // slots per channel queue (node-limited kernels)
    double timeout_s = 10;      // a stalled queue fails the call instead of hanging (node-limited kernels)
};
// Per rank r: send[r] holds its rows grouped by destination (send_offsets[r][p] .. +send_counts[r][p] go to p);
// recv[r] receives them source-major: rows from rank 0 first, then rank 1, ... Each row is copied once, source
// buffer to its place in the destination buffer, the grid's warps taking the rows of all channels in turn
// (16-byte copies where rows are aligned). Returns the kernel's time in seconds. ConfigError (before launch) for
// an SM budget beyond the device, counts that do not fit the buffers (recv_capacity_rows[r] rows), or a bad
// configuration.
double exchange_rows(const std::vector<const float*>& send, const std::vector<std::vector<int64_t>>& send_offsets,
                     const std::vector<std::vector<int64_t>>& send_counts, const std::vector<float*>& recv,
                     const std::vector<int64_t>& recv_capacity_rows, int dim, const ExchangeConfig& config,
                     cudaStream_t stream);
// The fastest of `repeats` plain copies of `bytes` by a grid of num_sms blocks (16-byte loads, four in flight per
// thread), in seconds: the ceiling an exchange on the same SM budget is measured against (commbench --backend cuda).
double copy_ceiling_seconds(size_t bytes, int num_sms, int repeats, cudaStream_t stream);
// The host-side checks of exchange_rows, callable without a device (device_sms: the device's SM count).
void check_exchange(int num_ranks, const std::vector<std::vector<int64_t>>& send_counts,
                    const std::vector<int64_t>& recv_capacity_rows, int dim, const ExchangeConfig& config,
                    int device_sms);

// ---- node-limited dispatch: sender / forwarder / receiver warps ----
// The virtual ranks form `nodes` nodes of equal size L (rank r is local rank r % L of node r / L). Per rank s:
// x[s] holds its tokens (one row each) and host_masks[s][t] the ranks token t goes to (bit p: rank p; at most
// 64 ranks). A token crosses to each target node once — into the queue of the relay there with s's local index
// — whatever number of its experts live on that node; the relay forwards it to each of those ranks inside the
// node. recv[p] receives, like exchange_rows, source-major: the tokens of rank 0 that go to p (ascending), then
// rank 1's, ...
//
// Every (s, node m) pair is a pipeline run by warps of one block: a sender (x[s] -> the inter-node queue of the
// pipeline, one row per token), a forwarder (that queue -> the intra-node queue of (s, d) for each rank d of m
// the row is for) and L receivers (the queue of (s, d) -> recv[d]).
struct HierarchicalResult {
    double seconds = 0;
    int64_t inter_node_rows = 0;       // rows that crossed between nodes (one per token and target node)
    int64_t flat_inter_node_rows = 0;  // what one row per (token, destination rank) would have sent across
};
HierarchicalResult dispatch_rows_hierarchical(const std::vector<const float*>& x,
                                              const std::vector<std::vector<uint64_t>>& host_masks, int nodes,
                                              const std::vector<float*>& recv,
                                              const std::vector<int64_t>& recv_capacity_rows, int dim,
                                              const ExchangeConfig& config, cudaStream_t stream);
// The host-side checks of dispatch_rows_hierarchical (device_sms: the device's SM count); returns the rows each
// rank receives.
std::vector<int64_t> check_hierarchical_dispatch(const std::vector<std::vector<uint64_t>>& host_masks, int nodes,
                                                 const std::vector<int64_t>& recv_capacity_rows, int dim,
                                                 const ExchangeConfig& config, int device_sms);

// The node-limited combine: dispatch_rows_hierarchical's pipelines run back, with the reduction inside the node.
// in[d] holds one row per (token, rank d) laid out like the dispatch's recv[d] for the same masks (capacity
// in_capacity_rows[d]); weights[d] (device, one per row; an empty vector: all 1) scales each row. Per pipeline
// (s, m): one sender warp per rank d of node m (in[d] x weight -> the queue to the relay), a forwarder (sums a
// token's rows from the ranks of node m in rank order -> one row across the inter-node queue) and a receiver
// (-> rank s's staging rows); then a pass over the tokens adds the nodes' partial sums in node order into
// y[s][t] (zero for a token no rank took). Bit-equal to kernels::combine_node_limited. The result counts the
// rows that crossed nodes (one per token and other node) and what one row per (token, rank) would have sent.
HierarchicalResult combine_rows_hierarchical(const std::vector<const float*>& in,
                                             const std::vector<const float*>& weights,
                                             const std::vector<std::vector<uint64_t>>& host_masks, int nodes,
                                             const std::vector<int64_t>& in_capacity_rows,
                                             const std::vector<float*>& y, int dim, const ExchangeConfig& config,
                                             cudaStream_t stream);

// ---- expert GEMMs (cuBLAS, BF16 in, fp32 accumulate and out) ----
// For each expert e: c[e] [rows[e] x n] = a[e] [rows[e] x k] * b[e] [k x n], row-major. a and b hold BF16 bit
// patterns (uint16_t). Experts with zero rows are skipped. All experts go to cuBLAS in one grouped call
// (cublasGemmGroupedBatchedEx, a group per expert: its own row count); a cuBLAS that reports this type
// combination unsupported gets one cublasGemmEx per expert from then on. Returns the path taken.
enum class GemmPath { Grouped, PerExpert };
GemmPath expert_gemm_bf16(const std::vector<const uint16_t*>& a, const std::vector<const uint16_t*>& b,
                      const std::vector<float*>& c, const std::vector<int>& rows, int k, int n, cudaStream_t stream);

// ---- the fp32 math of an expert MLP on the device (the executor's CUDA stage path) ----
// Row-major C [m x n] = alpha op(A) op(B) + beta C, as kernels::gemm, through cuBLAS in pedantic fp32 (no TF32).
void gemm_f32(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, const float* b, float beta,
              float* c, cudaStream_t stream);
// h = silu(a) * b and its backward, elementwise, as kernels::swiglu_forward / swiglu_backward.
void swiglu_forward(const float* a, const float* b, size_t n, float* h, cudaStream_t stream);
void swiglu_backward(const float* dh, const float* a, const float* b, size_t n, float* da, float* db,
                     cudaStream_t stream);

}  // namespace duplex::cuda
