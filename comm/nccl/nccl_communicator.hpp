// The NCCL backend: a communicator over device buffers, bootstrapped through the Store (rank 0 creates the NCCL
// unique id and publishes it; every rank reads it and joins). Same shape as Communicator — async calls that
// return a Work whose wait() rethrows failures and times out naming the operation — but on device memory and
// a CUDA stream, with NCCL's own reductions; all-to-all-v is grouped send/recv.
//
//   auto store = std::make_shared<TcpStore>(host, port, token);
//   auto nccl = NcclCommunicator::create(*store, rank, world, /*device=*/rank % num_gpus);
//   nccl->all_to_all_v(d_send, send_bytes, send_off, d_recv, recv_bytes, recv_off)->wait();
//   nccl->all_reduce(d_grad, count, DType::F32)->wait();
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/store.hpp"
#include "core/dtype.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace duplex {

class NcclCommunicator {
public:
    // Collective over the `size` ranks sharing `store`; `key` names this communicator in the store. Sets the
    // calling thread's device. timeout_s < 0: DUPLEX_COMM_TIMEOUT.
    static std::shared_ptr<NcclCommunicator> create(Store& store, int rank, int size, int device,
                                                    const std::string& key = "nccl/id", double timeout_s = -1);
    ~NcclCommunicator();
    NcclCommunicator(const NcclCommunicator&) = delete;
    NcclCommunicator& operator=(const NcclCommunicator&) = delete;

    int rank() const { return rank_; }
    int size() const { return size_; }
    int device() const { return device_; }
    cudaStream_t stream() const { return stream_; }

    WorkPtr isend(const void* buf, size_t bytes, int peer);
    WorkPtr irecv(void* buf, size_t bytes, int peer);
    // Byte counts and offsets per peer, as Communicator::all_to_all_v.
    WorkPtr all_to_all_v(const void* send, const std::vector<size_t>& send_bytes, const std::vector<size_t>& send_off,
                         void* recv, const std::vector<size_t>& recv_bytes, const std::vector<size_t>& recv_off);
    WorkPtr all_reduce(void* buf, size_t count, DType type);                                // sum, in place
    WorkPtr reduce_scatter(const void* send, void* recv, size_t count_per_rank, DType type);  // sum
    WorkPtr all_gather(const void* send, void* recv, size_t bytes_per_rank);
    WorkPtr barrier();
    // Aborts the communicator: every pending and later operation fails.
    void abort(const std::string& reason);

    struct Impl;

private:
    NcclCommunicator() = default;
    WorkPtr finish(const std::string& op);
    int rank_ = 0, size_ = 0, device_ = 0;
    double timeout_s_ = 300;
    cudaStream_t stream_ = nullptr;
    std::unique_ptr<Impl> impl_;
};

}  // namespace duplex
