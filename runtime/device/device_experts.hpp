// The routed experts of a stage on a GPU: the executor's CUDA path for the MoE layers (`duplex train --experts-on
// cuda`). Expert rows arrive from the dispatch (any exchange: local, flat or hierarchical), the SwiGLU MLPs of the
// local experts run on the device — cuBLAS fp32 GEMMs per expert, the SwiGLU kernel — on the calling thread's
// own stream (cudaStreamPerThread), so the two halves of a DualPipe F&B pair, which run on two threads, overlap
// on the device as they do on the CPU. A layer's weights go up once per step (at its first forward after
// ModelStage::zero_grad, which calls weights_changed) and serve every microbatch. What backward needs stays on the
// device between the passes (inputs and the two gate projections; the SwiGLU output is recomputed, it is cheap);
// the weight gradients are computed in the W pass and added into Param::grad on the host, where the optimizer runs.
//
//   stage.set_expert_compute(make_device_experts(/*device=*/0));
#pragma once

#include <memory>

#include "runtime/model/stage.hpp"

namespace duplex {

// ConfigError when this build has no CUDA or the device does not exist.
std::shared_ptr<ExpertCompute<float>> make_device_experts(int device);
// Whether make_device_experts can work here (CUDA built in and a device present), and the GPUs present.
bool device_experts_available();
int cuda_device_count();
// Gives `stage` the device experts of GPU `device`; nothing for device < 0. ConfigError for fp64 stages (the
// device path is fp32).
template <typename T>
void attach_device_experts(ModelStage<T>& stage, int device);

}  // namespace duplex
