#include "comm/nccl/nccl_communicator.hpp"

#include <cuda_runtime.h>

#include <chrono>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "comm/nccl/nccl_check.hpp"
#include "core/clock.hpp"
#include "core/cuda_check.hpp"
#include "core/error.hpp"
#include "core/log.hpp"

namespace duplex {

namespace {

ncclDataType_t nccl_type(DType t) {
    switch (t) {
        case DType::F32: return ncclFloat32;
        case DType::F64: return ncclFloat64;
        case DType::BF16: return ncclBfloat16;
        case DType::I32: return ncclInt32;
        case DType::I64: return ncclInt64;
        case DType::U8:
        case DType::E4M3: return ncclUint8;
    }
    return ncclUint8;
}

void check_reducible(DType t, const char* op) {
    DUPLEX_CHECK_ARG(t != DType::E4M3 && t != DType::U8, op, "cannot sum {} values", dtype_name(t));
}

}  // namespace

struct NcclCommunicator::Impl {
    ncclComm_t comm = nullptr;
    bool aborted = false;
    std::string abort_reason;
};

namespace {

// Completion of an operation queued on the communicator's stream: an event recorded after it.
class NcclWork : public Work {
public:
    NcclWork(NcclCommunicator::Impl& impl, cudaEvent_t event, std::string op, int rank, double timeout_s)
        : impl_(impl), event_(event), op_(std::move(op)), rank_(rank), timeout_s_(timeout_s) {}
    ~NcclWork() override { cudaEventDestroy(event_); }

    bool test() override {
        if (impl_.aborted) throw CommError(fmt::format("rank {}: {}: {}", rank_, op_, impl_.abort_reason));
        cudaError_t rc = cudaEventQuery(event_);
        if (rc == cudaSuccess) return true;
        if (rc != cudaErrorNotReady)
            throw_api_error("CUDA", "cudaEventQuery", rc, cudaGetErrorString(rc), __FILE__, __LINE__);
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(impl_.comm, &async);
        if (async != ncclSuccess && async != ncclInProgress)
            throw CommError(fmt::format("rank {}: {} failed in NCCL: {}", rank_, op_, ncclGetErrorString(async)));
        return false;
    }

    void wait(double timeout_s) override {
        Deadline deadline(timeout_s < 0 ? timeout_s_ : timeout_s);
        while (!test()) {
            if (deadline.expired()) {
                // A stuck collective cannot be cancelled alone: abort the communicator so every rank's wait ends.
                impl_.aborted = true;
                impl_.abort_reason = fmt::format("{} timed out", op_);
                ncclCommAbort(impl_.comm);
                impl_.comm = nullptr;
                throw TimeoutError(fmt::format("rank {}: {}", rank_, op_), timeout_s < 0 ? timeout_s_ : timeout_s);
            }
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    }

private:
    NcclCommunicator::Impl& impl_;
    cudaEvent_t event_;
    std::string op_;
    int rank_;
    double timeout_s_;
};

}  // namespace

std::shared_ptr<NcclCommunicator> NcclCommunicator::create(Store& store, int rank, int size, int device,
                                                           const std::string& key, double timeout_s) {
    DUPLEX_CHECK_ARG(size >= 1 && rank >= 0 && rank < size, "nccl", "rank {} outside a world of {}", rank, size);
    int devices = 0;
    DUPLEX_CUDA_CHECK(cudaGetDeviceCount(&devices));
    DUPLEX_CHECK_ARG(device >= 0 && device < devices, "nccl: device", "rank {} asks for device {} of {}", rank, device,
                     devices);
    std::shared_ptr<NcclCommunicator> c(new NcclCommunicator());
    c->impl_ = std::make_unique<Impl>();
    c->rank_ = rank;
    c->size_ = size;
    c->device_ = device;
    if (timeout_s < 0) timeout_s = default_comm_timeout();
    c->timeout_s_ = timeout_s;
    DUPLEX_CUDA_CHECK(cudaSetDevice(device));
    ncclUniqueId id;
    if (rank == 0) {
        DUPLEX_NCCL_CHECK(ncclGetUniqueId(&id));
        store.set(key, std::string(reinterpret_cast<const char*>(&id), sizeof(id)));
    } else {
        std::string blob = store.get(key, timeout_s);
        DUPLEX_CHECK_ARG(blob.size() == sizeof(id), "nccl", "store key '{}' holds {} bytes, not an NCCL id", key,
                         blob.size());
        std::memcpy(&id, blob.data(), sizeof(id));
    }
    DUPLEX_NCCL_CHECK(ncclCommInitRank(&c->impl_->comm, size, id, rank));
    DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking));
    log::info("comm", "rank {}: NCCL communicator of {} ranks on device {}", rank, size, device);
    return c;
}

NcclCommunicator::~NcclCommunicator() {
    if (impl_ && impl_->comm) {
        if (impl_->aborted)
            ncclCommAbort(impl_->comm);
        else
            ncclCommDestroy(impl_->comm);
    }
    if (stream_) cudaStreamDestroy(stream_);
}

WorkPtr NcclCommunicator::finish(const std::string& op) {
    cudaEvent_t e = nullptr;
    DUPLEX_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    DUPLEX_CUDA_CHECK(cudaEventRecord(e, stream_));
    return std::make_shared<NcclWork>(*impl_, e, op, rank_, timeout_s_);
}

WorkPtr NcclCommunicator::isend(const void* buf, size_t bytes, int peer) {
    DUPLEX_CHECK_ARG(peer >= 0 && peer < size_, "nccl send", "peer {} outside 0..{}", peer, size_ - 1);
    DUPLEX_NCCL_CHECK(ncclSend(buf, bytes, ncclUint8, peer, impl_->comm, stream_));
    return finish(fmt::format("send of {} bytes to rank {}", bytes, peer));
}

WorkPtr NcclCommunicator::irecv(void* buf, size_t bytes, int peer) {
    DUPLEX_CHECK_ARG(peer >= 0 && peer < size_, "nccl recv", "peer {} outside 0..{}", peer, size_ - 1);
    DUPLEX_NCCL_CHECK(ncclRecv(buf, bytes, ncclUint8, peer, impl_->comm, stream_));
    return finish(fmt::format("receive of {} bytes from rank {}", bytes, peer));
}

WorkPtr NcclCommunicator::all_to_all_v(const void* send, const std::vector<size_t>& send_bytes,
                                       const std::vector<size_t>& send_off, void* recv,
                                       const std::vector<size_t>& recv_bytes, const std::vector<size_t>& recv_off) {
    DUPLEX_CHECK_ARG(send_bytes.size() == size_t(size_) && send_off.size() == size_t(size_) &&
                         recv_bytes.size() == size_t(size_) && recv_off.size() == size_t(size_),
                     "nccl all_to_all_v", "needs {} counts and offsets each", size_);
    DUPLEX_NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < size_; ++p) {
        if (send_bytes[p])
            DUPLEX_NCCL_CHECK(ncclSend(static_cast<const char*>(send) + send_off[p], send_bytes[p], ncclUint8, p,
                                       impl_->comm, stream_));
        if (recv_bytes[p])
            DUPLEX_NCCL_CHECK(
                ncclRecv(static_cast<char*>(recv) + recv_off[p], recv_bytes[p], ncclUint8, p, impl_->comm, stream_));
    }
    DUPLEX_NCCL_CHECK(ncclGroupEnd());
    return finish("all_to_all_v");
}

WorkPtr NcclCommunicator::all_reduce(void* buf, size_t count, DType type) {
    check_reducible(type, "nccl all_reduce");
    DUPLEX_NCCL_CHECK(ncclAllReduce(buf, buf, count, nccl_type(type), ncclSum, impl_->comm, stream_));
    return finish(fmt::format("all_reduce of {} {}", count, dtype_name(type)));
}

WorkPtr NcclCommunicator::reduce_scatter(const void* send, void* recv, size_t count_per_rank, DType type) {
    check_reducible(type, "nccl reduce_scatter");
    DUPLEX_NCCL_CHECK(ncclReduceScatter(send, recv, count_per_rank, nccl_type(type), ncclSum, impl_->comm, stream_));
    return finish(fmt::format("reduce_scatter of {} {} per rank", count_per_rank, dtype_name(type)));
}

WorkPtr NcclCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
    DUPLEX_NCCL_CHECK(ncclAllGather(send, recv, bytes_per_rank, ncclUint8, impl_->comm, stream_));
    return finish(fmt::format("all_gather of {} bytes per rank", bytes_per_rank));
}

WorkPtr NcclCommunicator::barrier() {
    // A one-element all-reduce on a scratch device word.
    void* word = nullptr;
    DUPLEX_CUDA_CHECK(cudaMallocAsync(&word, sizeof(int), stream_));
    DUPLEX_CUDA_CHECK(cudaMemsetAsync(word, 0, sizeof(int), stream_));
    DUPLEX_NCCL_CHECK(ncclAllReduce(word, word, 1, ncclInt32, ncclSum, impl_->comm, stream_));
    DUPLEX_CUDA_CHECK(cudaFreeAsync(word, stream_));
    return finish("barrier");
}

void NcclCommunicator::abort(const std::string& reason) {
    if (impl_->aborted) return;
    impl_->aborted = true;
    impl_->abort_reason = reason;
    ncclCommAbort(impl_->comm);
    impl_->comm = nullptr;
}

}  // namespace duplex
