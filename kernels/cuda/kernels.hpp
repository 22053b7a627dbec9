// The GPU kernels of the expert-parallel path. Host launchers with explicit arguments and a stream (pointers are
// device pointers unless named host_*); each one validates its arguments on the host and throws ConfigError
// before anything is launched. Every kernel has a CPU reference (kernels/cpu/) and a test comparing the two
// (tests/cuda/, ctest label `gpu`, skipped without a device).
//
//   FP8:      quantize_fp8_1x128 / dequantize_fp8_1x128 (activations), *_128x128 (weights) — bit-equal to the
//             CPU reference (same e4m3 conversion, IEEE division).
//   permute:  permute_rows / combine_rows — the dispatch layout of kernels/cpu/permute.hpp; combine multiplies
//             and adds without fusing, in slot order, so it is bit-equal to the CPU reference.
//   exchange: exchange_rows / exchange_segments — the all-to-all of dispatch and combine between "virtual ranks",
//             each row written once (buffers on one device, or peers' buffers opened through CUDA IPC), on a
//             budget of SMs, source-major or in any layout given as segments;
//             dispatch_rows_node_limited / combine_rows_node_limited — dispatch from the tokens and combine into
//             them, flat (one node) or node-limited (one crossing per token and node, a relay forwarding inside the
//             node; combine reduces inside the node before crossing), rows in fp32, BF16 or FP8 with 1x128 scales.
//   GEMM:     expert_gemm_bf16 — per-expert [rows x k] x [k x n] products, one grouped cuBLAS call, BF16 in, fp32 out;
//             gemm_f32 and swiglu_* — the fp32 expert MLP of the executor's device path (runtime/device_experts);
//             gemm_bf16, swiglu_*_bf16, to_bf16 / from_bf16 — the BF16 expert MLP of runtime/device_moe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
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
    int num_sms = 20;         // blocks of the kernels: the SMs they may occupy (DeepSeek-V3: 20 of 132)
    int64_t relay_rows = 0;   // node-limited kernels: relay rows held at once (0: all a call needs; else >= nodes)
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
// The same kernel for any layout: segment k moves rows [src_row, src_row + rows) of send[src] to [dst_row, ...) of
// recv[dst]. Segments must not overlap in a destination. ConfigError (before launch) for ranks out of range,
// negative rows or offsets, a segment past its destination's capacity, or an SM budget beyond the device.
struct RowSegment {
    int src = 0, dst = 0;
    int64_t src_row = 0, dst_row = 0, rows = 0;
};
double exchange_segments(const std::vector<const float*>& send, const std::vector<float*>& recv,
                         const std::vector<RowSegment>& segments, const std::vector<int64_t>& recv_capacity_rows,
                         int dim, const ExchangeConfig& config, cudaStream_t stream);
// The fastest of `repeats` plain copies of `bytes` by a grid of num_sms blocks (16-byte loads, four in flight per
// thread), in seconds: the ceiling an exchange on the same SM budget is measured against (commbench --backend cuda).
double copy_ceiling_seconds(size_t bytes, int num_sms, int repeats, cudaStream_t stream);
// That plain copy, launched on `stream` without waiting (16-byte aligned buffers, bytes a multiple of 16): what
// an exchange on the same SM budget is compared with beside a GEMM (duplex_bench_gpu).
void plain_copy(void* to, const void* from, size_t bytes, int num_sms, cudaStream_t stream);
// The host-side checks of exchange_rows, callable without a device (device_sms: the device's SM count).
void check_exchange(int num_ranks, const std::vector<std::vector<int64_t>>& send_counts,
                    const std::vector<int64_t>& recv_capacity_rows, int dim, const ExchangeConfig& config,
                    int device_sms);

// ---- dispatch and combine from and into the tokens: flat or node-limited, fp32 / BF16 / FP8 rows ----
// A row's element type. FP8 rows are e4m3 bytes with one fp32 scale per 128 columns (quantize_fp8_1x128's
// layout); they travel as two planes, the bytes and the scales, with the same moves. DeepEP's configuration:
// FP8 dispatch, BF16 combine.
enum class RowType { F32, BF16, FP8 };
const char* row_type_name(RowType type);
// "f32" | "bf16" | "fp8"; ConfigError naming `flag` otherwise.
RowType parse_row_type(const std::string& name, const std::string& flag);
// Bytes per row of each plane: {4 dim}, {2 dim}, {dim, 4 dim / 128}. ConfigError for a width below 1, or, for
// FP8, not a multiple of 128.
std::vector<size_t> row_plane_bytes(RowType type, int dim);

// Per plane, per rank: the base of its rows (device).
using SourcePlanes = std::vector<std::vector<const void*>>;
using TargetPlanes = std::vector<std::vector<void*>>;

// The virtual ranks form `nodes` nodes of equal size L (rank r is local rank r % L of node r / L); host_masks[s][t]
// has bit d when token t of rank s goes to rank d (at most 64 ranks). The moves are planned on the host
// (kernels/exchange_plan.hpp) and run by the warps of the SM budget, each taking output rows in turn, 16-byte
// copies where rows are aligned. One node: each row copied once, x[s] to recv[d]. Several: a token crosses to
// each target node once, into a relay row there, and the relay copies it to each rank of that node it is for;
// relay rows come from a stream-ordered allocation (config.relay_rows bounds it: rounds of tokens).
// recv[d] receives source-major: the tokens of rank 0 that go to d (ascending), then rank 1's, ...
struct NodeLimitedResult {
    double seconds = 0;
    int64_t inter_node_rows = 0;       // rows that crossed between nodes (one per token and target node)
    int64_t flat_inter_node_rows = 0;  // what one row per (token, destination rank) would have sent across
};
NodeLimitedResult dispatch_rows_node_limited(RowType type, int dim, const SourcePlanes& x,
                                              const std::vector<std::vector<uint64_t>>& host_masks, int nodes,
                                              const TargetPlanes& recv, const std::vector<int64_t>& recv_capacity_rows,
                                              const ExchangeConfig& config, cudaStream_t stream);
// The host-side checks of both directions (device_sms: the device's SM count): ranks, nodes, routing, the
// planes' count, row widths, buffers (capacity_rows[d]: rows the dispatch delivers to d / the combine reads from
// d) and the budget; returns the rows each rank receives (dispatch) or contributes (combine).
std::vector<int64_t> check_node_limited(RowType type, int dim, const std::vector<std::vector<uint64_t>>& host_masks,
                                        int nodes, const std::vector<int64_t>& capacity_rows, size_t planes,
                                        const ExchangeConfig& config, int device_sms);

// The combine (F32 or BF16 rows): in[d] holds one row per (token, rank d) laid out like the dispatch's recv[d] for
// the same masks; weights[d] (device, one fp32 factor per row; an empty vector: all 1) scales each row. One
// node: y[s][t] = the sum, from 0, of a token's rows in rank order. Several: each relay sums the token's rows of
// its node in rank order (rounded to the row type: what crosses back), and y[s][t] sums those partials in node
// order (zero for a token no rank took). Products and sums in fp32, each rounded, unfused: bit-equal to
// kernels::combine_node_limited / combine_node_limited_bf16.
NodeLimitedResult combine_rows_node_limited(RowType type, int dim, const std::vector<const void*>& in,
                                             const std::vector<const float*>& weights,
                                             const std::vector<std::vector<uint64_t>>& host_masks, int nodes,
                                             const std::vector<int64_t>& in_capacity_rows, const std::vector<void*>& y,
                                             const ExchangeConfig& config, cudaStream_t stream);

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

// ---- the BF16 math of an expert MLP (DeviceMoeLayer with bf16 = true); values are BF16 bit patterns ----
// Row-major C [m x n] = alpha op(A) op(B) + beta C with BF16 A and B, fp32 accumulation (tensor cores), C in BF16
// (c_is_bf16) or fp32 (weight gradients into fp32 masters).
void gemm_bf16(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const uint16_t* a, const uint16_t* b,
               float beta, void* c, bool c_is_bf16, cudaStream_t stream);
// SwiGLU and its backward on BF16 values: widened, computed in fp32 as swiglu_*, each result rounded once.
void swiglu_forward_bf16(const uint16_t* a, const uint16_t* b, size_t n, uint16_t* h, cudaStream_t stream);
void swiglu_backward_bf16(const uint16_t* dh, const uint16_t* a, const uint16_t* b, size_t n, uint16_t* da,
                          uint16_t* db, cudaStream_t stream);
// fp32 -> BF16 (round to nearest even, as core/dtype.hpp fp32_to_bf16) and back (exact).
void to_bf16(const float* x, size_t n, uint16_t* h, cudaStream_t stream);
void from_bf16(const uint16_t* h, size_t n, float* x, cudaStream_t stream);

}  // namespace duplex::cuda
