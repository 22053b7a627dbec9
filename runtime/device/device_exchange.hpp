// The expert exchanges of the executor on the GPU (`duplex train --experts-on cuda --exchange-on cuda`): the rows
// of every dispatch and combine of an EP group move through the exchange kernel (kernels/cuda exchange_rows) on a
// stream of their own and a budget of SMs, instead of the communicator. Each rank uploads what it sends and
// downloads what comes back to it (the rest of the stage runs on the host); the counts travel through the
// communicator.
// Two ways to reach the peers' buffers, chosen when the transport is made:
//   - shared: the group's ranks are threads of one process on one GPU (inproc): group rank 0 launches one kernel
//     that moves every rank's rows (raw device pointers gathered through the communicator);
//   - push: separate processes (mpirun, torchrun) or GPUs, on one node: each rank's kernel writes its own rows
//     into its peers' receive buffers, opened through CUDA IPC handles gathered through the communicator (raw
//     pointers with peer access for threads of its own process). A buffer that grows gets a new handle.
// While one exchange kernel runs on its SMs, the other half of a DualPipe F&B pair computes its experts on the
// rest of the device.
//
// With the device experts on the same GPU (runtime/device/device_experts.hpp) the rows stay there from dispatch to combine:
// a dispatch's rows are written straight into a fresh expert-major buffer the experts read (RowTransport::
// exchange_to_experts, kernels::plan_expert_major), and their outputs go from there into the token ranks' receive
// buffers (exchange_from_experts); only the tokens' rows go up and the returned rows come down. The backward's
// gradients take the same two paths.
//
// The kernel moves bytes exactly, so training is bit for bit what the communicator's exchange gives.
//
//   auto t = make_device_transport(ep_group, /*device=*/0, /*sms=*/20);   // collective over ep_group
//   exchange->set_transport(t);
#pragma once

#include <memory>

#include "comm/communicator.hpp"
#include "runtime/model/expert_exchange.hpp"

namespace duplex {

// Collective over `group`. ConfigError when CUDA is not built in, the device does not exist or `sms` is not
// within 1..its SM count; on every rank of the group when its ranks span hosts, or a rank's GPU cannot reach a
// peer's (not visible to its process, no peer access).
std::shared_ptr<RowTransport<float>> make_device_transport(std::shared_ptr<Communicator> group, int device, int sms);

// Gives `exchange` the device transport (collective over `group`); ConfigError for fp64 models (the device path is
// fp32).
template <typename T>
void attach_device_transport(DistributedExchange<T>& exchange, std::shared_ptr<Communicator> group, int device,
                             int sms);

}  // namespace duplex
