#include "comm/nccl/nccl_channels.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "comm/communicator.hpp"
#include "comm/nccl/nccl_check.hpp"
#include "core/clock.hpp"
#include "core/cuda_check.hpp"
#include "core/error.hpp"
#include "core/log.hpp"

namespace duplex {

int visible_cuda_devices() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

namespace {

bool is_device_pointer(const void* buf) {
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, buf) != cudaSuccess) {
        cudaGetLastError();  // a plain host pointer on older drivers: not an error worth keeping
        return false;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

class NcclChannels : public ByteChannels {
public:
    NcclChannels(std::shared_ptr<Store> store, int rank, int device, std::string prefix, double timeout_s)
        : store_(std::move(store)), rank_(rank), device_(device), prefix_(std::move(prefix)), timeout_s_(timeout_s) {}

    ~NcclChannels() override {
        cudaSetDevice(device_);
        for (auto* channels : {&to_, &from_})
            for (auto& [peer, c] : *channels) {
                // Every transfer has finished on both sides (or failed): nothing of the peer's waits on these.
                if (c.comm) ncclCommAbort(c.comm);
                if (c.stream) cudaStreamDestroy(c.stream);
            }
        for (auto& [bytes, p] : pinned_) cudaFreeHost(p);
    }

    std::string describe() const override {
        int version = 0;
        ncclGetVersion(&version);
        return fmt::format("NCCL {}.{}.{} on device {}, one two-rank communicator per direction", version / 10000,
                           (version / 100) % 100, version % 100, device_);
    }

    bool device_memory(const void* buf) const override { return is_device_pointer(buf); }

    void post_send(int peer, const void* buf, size_t bytes, Done done) override {
        post(peer, Op{true, const_cast<void*>(buf), bytes, std::move(done)});
    }
    void post_recv(int peer, void* buf, size_t bytes, Done done) override { post(peer, Op{false, buf, bytes, std::move(done)}); }

    bool poll() override {
        bool any = false;
        cudaSetDevice(device_);
        for (auto* channels : {&to_, &from_})
            for (auto& [peer, c] : *channels) any |= poll_channel(peer, c);
        return drain() || any;
    }

    void fail(int peer, const std::string& reason) override {
        cudaSetDevice(device_);
        for (auto* channels : {&to_, &from_})
            for (auto& [p, c] : *channels)
                if (peer < 0 || p == peer) fail_channel(c, reason);
        if (peer < 0 || peer == rank_) {
            for (auto* q : {&self_sends_, &self_recvs_})
                for (Op& op : std::exchange(*q, {})) finish(op, reason);
        }
        drain();
    }

private:
    struct Op {
        bool send;
        void* buf;
        size_t bytes;
        Done done;
        void* pinned = nullptr;  // host buffers: the pinned staging copy (its capacity in pinned_bytes)
        size_t pinned_bytes = 0;
        void* staged = nullptr;  // host buffers: the device copy NCCL moves
        cudaEvent_t event = nullptr;
    };
    // One direction with one peer: in its two-rank communicator the sender is rank 0, the receiver rank 1.
    struct Channel {
        bool send = true;          // this rank's side: sender (rank 0) or receiver (rank 1)
        ncclComm_t comm = nullptr;
        cudaStream_t stream = nullptr;
        bool ready = false;
        std::string failed;        // why the channel is unusable ("" while it is not)
        std::deque<Op> waiting;    // posted while the communicator was still being created
        std::deque<Op> issued;     // on the stream, in order
    };

    std::string key(int src, int dst) const { return fmt::format("{}/{}->{}", prefix_, src, dst); }

    void post(int peer, Op op) {
        if (peer == rank_) return post_self(std::move(op));
        Channel& c = (op.send ? to_ : from_)[peer];
        c.send = op.send;
        if (!c.failed.empty()) return finish(op, c.failed);
        try {
            cudaSetDevice(device_);
            if (!c.comm) open(peer, op.send, c);
            c.waiting.push_back(std::move(op));
            if (c.ready) issue_waiting(c);
        } catch (const std::exception& e) {
            if (op.done) finish(op, e.what());  // not queued yet
            fail_channel(c, fmt::format("rank {}: NCCL channel {} rank {}: {}", rank_, op.send ? "to" : "from", peer,
                                        e.what()));
        }
    }

    // The receiving side creates the id and publishes it before its Clear goes out; the sender reads it when the
    // Clear arrives, so the wait below is short.
    void open(int peer, bool send, Channel& c) {
        ncclUniqueId id;
        if (send) {
            std::string blob = store_->get(key(rank_, peer), timeout_s_);
            if (blob.size() != sizeof(id))
                throw CommError(fmt::format("store key '{}' holds {} bytes, not an NCCL id", key(rank_, peer), blob.size()));
            std::memcpy(&id, blob.data(), sizeof(id));
        } else {
            DUPLEX_NCCL_CHECK(ncclGetUniqueId(&id));
            store_->set(key(peer, rank_), std::string(reinterpret_cast<const char*>(&id), sizeof(id)));
        }
        DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking));
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;  // the progress thread must not wait for the peer's progress thread here
        ncclResult_t rc = ncclCommInitRankConfig(&c.comm, 2, id, send ? 0 : 1, &config);
        if (rc != ncclSuccess && rc != ncclInProgress)
            throw_api_error("NCCL", "ncclCommInitRankConfig", rc, ncclGetErrorString(rc), __FILE__, __LINE__);
        c.ready = rc == ncclSuccess && state(c) == ncclSuccess;
    }

    ncclResult_t state(Channel& c) {
        ncclResult_t s = ncclSuccess;
        ncclResult_t rc = ncclCommGetAsyncError(c.comm, &s);
        return rc != ncclSuccess ? rc : s;
    }

    // After a call on a non-blocking communicator returned ncclInProgress: waits until it has been enqueued.
    void settle(Channel& c, ncclResult_t rc, const char* call) {
        Deadline d(timeout_s_);
        while (rc == ncclInProgress && !d.expired()) {
            std::this_thread::yield();
            rc = state(c);
        }
        if (rc != ncclSuccess) throw_api_error("NCCL", call, rc, ncclGetErrorString(rc), __FILE__, __LINE__);
    }

    void issue_waiting(Channel& c) {
        while (!c.waiting.empty()) {
            Op& op = c.waiting.front();
            int peer_in_comm = op.send ? 1 : 0;
            void* data = op.buf;
            if (op.bytes > 0 && !is_device_pointer(op.buf)) {
                take_pinned(op);
                DUPLEX_CUDA_CHECK(cudaMallocAsync(&op.staged, op.bytes, c.stream));
                if (op.send) {
                    std::memcpy(op.pinned, op.buf, op.bytes);
                    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(op.staged, op.pinned, op.bytes, cudaMemcpyHostToDevice, c.stream));
                }
                data = op.staged;
            }
            if (op.send)
                settle(c, ncclSend(data, op.bytes, ncclUint8, peer_in_comm, c.comm, c.stream), "ncclSend");
            else
                settle(c, ncclRecv(data, op.bytes, ncclUint8, peer_in_comm, c.comm, c.stream), "ncclRecv");
            if (op.staged) {
                if (!op.send)
                    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(op.pinned, op.staged, op.bytes, cudaMemcpyDeviceToHost, c.stream));
                DUPLEX_CUDA_CHECK(cudaFreeAsync(op.staged, c.stream));
            }
            DUPLEX_CUDA_CHECK(cudaEventCreateWithFlags(&op.event, cudaEventDisableTiming));
            DUPLEX_CUDA_CHECK(cudaEventRecord(op.event, c.stream));
            c.issued.push_back(std::move(op));
            c.waiting.pop_front();
        }
    }

    bool poll_channel(int peer, Channel& c) {
        if (!c.failed.empty() || !c.comm) return false;
        bool any = false;
        try {
            ncclResult_t s = state(c);
            if (s != ncclSuccess && s != ncclInProgress)
                throw CommError(fmt::format("NCCL reports {}", ncclGetErrorString(s)));
            if (!c.ready && s == ncclSuccess) {
                c.ready = true;
                issue_waiting(c);
                any = true;
            }
            while (!c.issued.empty()) {
                Op& op = c.issued.front();
                cudaError_t rc = cudaEventQuery(op.event);
                if (rc == cudaErrorNotReady) break;
                if (rc != cudaSuccess) throw_api_error("CUDA", "cudaEventQuery", rc, cudaGetErrorString(rc), __FILE__, __LINE__);
                Op done = std::move(op);
                c.issued.pop_front();
                cudaEventDestroy(done.event);
                if (done.pinned) {
                    if (!done.send) std::memcpy(done.buf, done.pinned, done.bytes);
                    pinned_.emplace(done.pinned_bytes, done.pinned);
                }
                finish(done, "");
                any = true;
            }
        } catch (const std::exception& e) {
            fail_channel(c, fmt::format("rank {}: NCCL channel {} rank {}: {}", rank_, c.send ? "to" : "from", peer,
                                        e.what()));
            any = true;
        }
        return any;
    }

    // The transfers in flight cannot finish: abort the communicator and fail them. Their staging buffers are not
    // reused (the aborted kernels may have touched them until the abort).
    void fail_channel(Channel& c, const std::string& reason) {
        if (c.failed.empty()) c.failed = reason;
        if (c.comm) ncclCommAbort(c.comm);
        c.comm = nullptr;
        for (auto* q : {&c.issued, &c.waiting})
            for (Op& op : std::exchange(*q, {})) finish(op, c.failed);
    }

    // Completions are reported from poll() and fail() only, never from a post: the caller holds its lock there.
    void finish(Op& op, std::string error) { finished_.emplace_back(std::move(op.done), std::move(error)); }
    bool drain() {
        bool any = !finished_.empty();
        while (!finished_.empty()) {
            auto [done, error] = std::move(finished_.front());
            finished_.pop_front();
            done(error);
        }
        return any;
    }

    void take_pinned(Op& op) {
        auto it = pinned_.lower_bound(op.bytes);
        if (it != pinned_.end()) {
            op.pinned_bytes = it->first;
            op.pinned = it->second;
            pinned_.erase(it);
            return;
        }
        op.pinned_bytes = std::max<size_t>(op.bytes, 64 << 10);
        DUPLEX_CUDA_CHECK(cudaMallocHost(&op.pinned, op.pinned_bytes));
    }

    // Sends and receives to self match in order; the copy happens when both are there.
    void post_self(Op op) {
        (op.send ? self_sends_ : self_recvs_).push_back(std::move(op));
        while (!self_sends_.empty() && !self_recvs_.empty()) {
            Op s = std::move(self_sends_.front()), r = std::move(self_recvs_.front());
            self_sends_.pop_front();
            self_recvs_.pop_front();
            std::string error;
            if (s.bytes > 0) {
                if (is_device_pointer(s.buf) || is_device_pointer(r.buf)) {
                    cudaSetDevice(device_);
                    cudaError_t rc = cudaMemcpy(r.buf, s.buf, s.bytes, cudaMemcpyDefault);
                    if (rc != cudaSuccess) error = fmt::format("rank {}: copy to itself: {}", rank_, cudaGetErrorString(rc));
                } else {
                    std::memcpy(r.buf, s.buf, s.bytes);
                }
            }
            finish(r, error);
            finish(s, error);
        }
    }

    std::shared_ptr<Store> store_;
    int rank_, device_;
    std::string prefix_;
    double timeout_s_;
    std::map<int, Channel> to_, from_;
    std::deque<Op> self_sends_, self_recvs_;
    std::multimap<size_t, void*> pinned_;  // free pinned staging buffers by capacity
    std::deque<std::pair<Done, std::string>> finished_;  // completions waiting for poll() or fail()
};

}  // namespace

std::shared_ptr<ByteChannels> make_nccl_channels(std::shared_ptr<Store> store, int rank, int size, int device,
                                                 const std::string& key_prefix, double timeout_s) {
    DUPLEX_CHECK_ARG(size >= 1 && rank >= 0 && rank < size, "nccl", "rank {} outside a world of {}", rank, size);
    int devices = visible_cuda_devices();
    DUPLEX_CHECK_ARG(devices > 0, "--backend", "nccl needs a CUDA device and this machine shows none");
    DUPLEX_CHECK_ARG(device >= 0 && device < devices, "nccl device", "rank {} asks for device {} of {}", rank, device,
                     devices);
    DUPLEX_CUDA_CHECK(cudaSetDevice(device));
    return std::make_shared<NcclChannels>(std::move(store), rank, device, key_prefix,
                                          timeout_s < 0 ? default_comm_timeout() : timeout_s);
}

}  // namespace duplex
