// NCCL's point-to-point calls as the payload channels of a RendezvousTransport (comm/rendezvous_transport.hpp):
// the nccl backend of launch().
//
// Each direction of a pair that talks gets a two-rank NCCL communicator of its own, created (non-blocking) the
// first time the pair does, its id passed through the Store by the receiving side, and its own stream on
// each side: a pair's two directions, and different peers, never queue behind each other, so the order in
// which the rendezvous protocol posts transfers cannot deadlock. Device buffers go to NCCL as they are; host
// buffers are staged through pinned host memory and a device buffer (the executor's activations and gradients
// are host vectors). A message to this rank itself is a copy.
//
// NOTE: NCCL puts one rank per GPU: a process or thread needs a device of its own (NCCL refuses two ranks of a
// communicator on one GPU), and each talking pair costs two communicators' buffers on each side.
#pragma once

#include <memory>
#include <string>

#include "comm/rendezvous_transport.hpp"
#include "comm/store.hpp"

namespace duplex {

// Channels of `rank` (of `size`) on CUDA device `device`; `key_prefix` names this world's ids in `store`.
std::shared_ptr<ByteChannels> make_nccl_channels(std::shared_ptr<Store> store, int rank, int size, int device,
                                                 const std::string& key_prefix, double timeout_s);

// The CUDA devices this process sees: 0 without a driver or a device (never throws).
int visible_cuda_devices();

}  // namespace duplex
