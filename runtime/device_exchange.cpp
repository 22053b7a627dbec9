#include "runtime/device_exchange.hpp"

#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"

#ifdef DUPLEX_HAVE_CUDA
#include <cuda_runtime.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/buffer.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
#endif

namespace duplex {

#ifdef DUPLEX_HAVE_CUDA
namespace {

class DeviceTransport : public RowTransport<float> {
public:
    DeviceTransport(std::shared_ptr<Communicator> group, int device, int sms)
        : group_(std::move(group)), device_(device) {
        config_.num_sms = sms;
        // Every rank learns every rank's process and device, so all of them agree on the verdict.
        const int n = group_->size();
        int64_t mine[2] = {int64_t(getpid()), int64_t(device)};
        std::vector<int64_t> all(2 * size_t(n));
        group_->all_gather(mine, all.data(), sizeof(mine))->wait();
        for (int r = 0; r < n; ++r)
            DUPLEX_CHECK_ARG(all[2 * r] == all[0] && all[2 * r + 1] == all[1], "--exchange-on",
                             "cuda: the EP group's ranks must be threads of one process on one GPU (the inproc "
                             "backend, one device); group rank {} is process {} on GPU {}, rank 0 process {} on GPU {}",
                             r, all[2 * r], all[2 * r + 1], all[0], all[1]);
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }
    ~DeviceTransport() override {
        if (stream_) cudaStreamDestroy(stream_);
    }

    std::vector<std::vector<float>> exchange(const std::vector<std::vector<float>>& per_peer, int width) override {
        const int n = group_->size(), me = group_->rank();
        DUPLEX_CHECK_ARG(int(per_peer.size()) == n && width >= 1, "device exchange", "{} peers' rows of width {} for {} ranks",
                         per_peer.size(), width, n);
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        // The whole count matrix: counts[s][p] rows from s to p.
        std::vector<int64_t> mine(n), flat(size_t(n) * n);
        size_t send_total = 0;
        for (int p = 0; p < n; ++p) {
            mine[p] = int64_t(per_peer[p].size() / size_t(width));
            send_total += per_peer[p].size();
        }
        group_->all_gather(mine.data(), flat.data(), sizeof(int64_t) * n)->wait();
        std::vector<std::vector<int64_t>> counts(n), offsets(n, std::vector<int64_t>(n, 0));
        std::vector<int64_t> recv_rows(n, 0);
        int64_t moved = 0;
        for (int s = 0; s < n; ++s) {
            counts[s].assign(flat.begin() + long(s) * n, flat.begin() + long(s + 1) * n);
            for (int p = 0; p < n; ++p) {
                if (p) offsets[s][p] = offsets[s][p - 1] + counts[s][p - 1];
                recv_rows[p] += counts[s][p];
                moved += counts[s][p];
            }
        }
        std::vector<std::vector<float>> out(n);
        if (moved == 0) return out;
        // Up: this rank's rows, grouped by destination.
        size_t recv_total = size_t(recv_rows[me]) * width;
        if (send_.size() < send_total) send_ = cuda::DeviceArray<float>(send_total);
        if (recv_.size() < recv_total) recv_ = cuda::DeviceArray<float>(recv_total);
        size_t at = 0;
        for (int p = 0; p < n; ++p) {
            send_.upload(per_peer[p].data(), per_peer[p].size(), cudaStreamPerThread, at);
            at += per_peer[p].size();
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
        int64_t ptrs[2] = {int64_t(reinterpret_cast<uintptr_t>(send_.get())),
                           int64_t(reinterpret_cast<uintptr_t>(recv_.get()))};
        std::vector<int64_t> all_ptrs(2 * size_t(n));
        group_->all_gather(ptrs, all_ptrs.data(), sizeof(ptrs))->wait();
        // Rank 0 moves every rank's rows in one launch; the others wait for its verdict.
        std::string failure;
        int64_t status = 0;
        if (me == 0) {
            std::vector<const float*> send(n);
            std::vector<float*> recv(n);
            for (int r = 0; r < n; ++r) {
                send[r] = reinterpret_cast<const float*>(uintptr_t(all_ptrs[2 * r]));
                recv[r] = reinterpret_cast<float*>(uintptr_t(all_ptrs[2 * r + 1]));
            }
            try {
                cuda::exchange_rows(send, offsets, counts, recv, recv_rows, width, config_, stream_);
            } catch (const std::exception& e) {
                failure = e.what();
                status = 1;
            }
        }
        std::vector<int64_t> statuses(n);
        group_->all_gather(&status, statuses.data(), sizeof(status))->wait();
        if (statuses[0] != 0)
            throw CommError(me == 0 ? fmt::format("EP exchange on GPU {}: {}", device_, failure)
                                    : fmt::format("EP exchange on GPU {}: the kernel launched by group rank 0 failed",
                                                  device_));
        // Down: what arrived, source-major.
        std::vector<float> got(recv_total);
        recv_.download(got.data(), recv_total, cudaStreamPerThread);
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
        size_t from = 0;
        for (int s = 0; s < n; ++s) {
            size_t len = size_t(counts[s][me]) * width;
            out[s].assign(got.begin() + long(from), got.begin() + long(from + len));
            from += len;
        }
        return out;
    }

private:
    std::shared_ptr<Communicator> group_;
    int device_;
    cuda::ExchangeConfig config_;
    cudaStream_t stream_ = nullptr;  // rank 0's kernels: a stream of their own
    cuda::DeviceArray<float> send_, recv_;
};

}  // namespace

std::shared_ptr<RowTransport<float>> make_device_transport(std::shared_ptr<Communicator> group, int device, int sms) {
    auto devices = cuda_devices();
    DUPLEX_CHECK_ARG(device >= 0 && device < int(devices.size()), "--exchange-on",
                     "cuda: GPU {} requested, this machine has {}", device, devices.size());
    DUPLEX_CHECK_ARG(sms >= 1 && sms <= devices[device].num_sms, "--comm-sms",
                     "{} SMs for the exchange kernel; {} has {}", sms, devices[device].name, devices[device].num_sms);
    return std::make_shared<DeviceTransport>(std::move(group), device, sms);
}

#else

std::shared_ptr<RowTransport<float>> make_device_transport(std::shared_ptr<Communicator>, int, int) {
    throw ConfigError("--exchange-on", "cuda: this build has no CUDA");
}

#endif

template <typename T>
void attach_device_transport(DistributedExchange<T>& exchange, std::shared_ptr<Communicator> group, int device,
                             int sms) {
    if constexpr (std::is_same_v<T, float>) {
        exchange.set_transport(make_device_transport(std::move(group), device, sms));
    } else {
        throw ConfigError("--exchange-on", "cuda: the device path runs fp32 models, not fp64");
    }
}

template void attach_device_transport<float>(DistributedExchange<float>&, std::shared_ptr<Communicator>, int, int);
template void attach_device_transport<double>(DistributedExchange<double>&, std::shared_ptr<Communicator>, int, int);

}  // namespace duplex
