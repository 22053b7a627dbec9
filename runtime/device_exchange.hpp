// The expert exchanges of the executor on the GPU (`duplex train --experts-on cuda --exchange-on cuda`): the rows
// of every dispatch and combine of an EP group move through the warp-specialized exchange kernel
// (kernels/cuda exchange_rows) on a stream of their own and a budget of SMs, instead of the communicator. The
// ranks of the group are threads of one process sharing one GPU (the inproc backend): each one uploads what it
// sends, group rank 0 launches one kernel that moves every rank's rows, and each one downloads what arrived. The
// rest of the stage runs on the host, so the rows go up and come back down around the kernel; the counts and
// device pointers travel through the communicator. While one thread's exchange kernel runs on its SMs, the other
// half of a DualPipe F&B pair computes its experts on the rest of the device.
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

// Collective over `group`. ConfigError, on every rank of the group, when CUDA is not built in, the device does
// not exist, `sms` is not within 1..its SM count, or the group's ranks are not all threads of this process on
// this device.
std::shared_ptr<RowTransport<float>> make_device_transport(std::shared_ptr<Communicator> group, int device, int sms);

// Gives `exchange` the device transport (collective over `group`); ConfigError for fp64 models (the device path is
// fp32).
template <typename T>
void attach_device_transport(DistributedExchange<T>& exchange, std::shared_ptr<Communicator> group, int device,
                             int sms);

}  // namespace duplex
