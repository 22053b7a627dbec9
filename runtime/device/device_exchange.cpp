#include "runtime/device/device_exchange.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"

#ifdef DUPLEX_HAVE_CUDA
#include <cuda_runtime.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/buffer.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
#include "kernels/exchange_plan.hpp"
#include "runtime/device/device_rows.hpp"
#endif

namespace duplex {

#ifdef DUPLEX_HAVE_CUDA
namespace {

// Who a rank is, for the peers to decide how to reach its buffers (gathered once, fixed-size for all_gather).
struct Whereabouts {
    int64_t pid = 0;
    int64_t device = 0;
    char host[64] = {};
    char bus_id[32] = {};  // the device's PCI bus id: the same GPU whatever CUDA_VISIBLE_DEVICES numbers it
};

// What a rank publishes per exchange in push mode: its receive buffer, raw (for threads of its process) and as a
// CUDA IPC handle (for other processes), and the buffer's generation (a new allocation gets a new handle).
struct RecvBuffer {
    int64_t pointer = 0;
    int64_t generation = 0;
    cudaIpcMemHandle_t handle{};
};

// A peer's buffer opened through its CUDA IPC handle, and the generation of that buffer.
struct Opened {
    void* mapped = nullptr;
    int64_t generation = 0;
};

class DeviceTransport : public RowTransport<float> {
public:
    DeviceTransport(std::shared_ptr<Communicator> group, int device, int sms)
        : group_(std::move(group)), device_(device) {
        config_.num_sms = sms;
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        // Every rank learns every rank's process, host and device, so all of them agree on the mode.
        const int n = group_->size();
        Whereabouts mine;
        mine.pid = getpid();
        mine.device = device_;
        gethostname(mine.host, sizeof(mine.host) - 1);
        DUPLEX_CUDA_CHECK(cudaDeviceGetPCIBusId(mine.bus_id, sizeof(mine.bus_id) - 1, device_));
        peers_.resize(n);
        group_->all_gather(&mine, peers_.data(), sizeof(mine))->wait();
        push_ = std::any_of(peers_.begin(), peers_.end(),
                            [&](const Whereabouts& w) { return w.pid != mine.pid || w.device != mine.device; });
        for (int r = 0; r < n; ++r)
            DUPLEX_CHECK_ARG(!push_ || std::strcmp(peers_[r].host, peers_[0].host) == 0, "--exchange-on",
                             "cuda: the EP group's GPUs must be on one node (CUDA IPC); group rank {} runs on {}, "
                             "rank 0 on {}",
                             r, peers_[r].host, peers_[0].host);
        // Push mode: every peer's GPU must be reachable from this one. Each rank checks its own, then all learn
        // every verdict, so all refuse together instead of some waiting for the others.
        std::string problem = push_ ? unreachable_peer(mine) : std::string();
        int64_t bad = problem.empty() ? 0 : 1;
        std::vector<int64_t> verdicts(n);
        group_->all_gather(&bad, verdicts.data(), sizeof(bad))->wait();
        for (int r = 0; r < n; ++r)
            if (verdicts[r])
                throw ConfigError("--exchange-on", r == group_->rank() ? "cuda: " + problem
                                                                       : fmt::format("cuda: group rank {} cannot reach "
                                                                                     "its peers' GPUs (see its error)", r));
        DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        opened_.assign(n, Opened{});
        opened_resident_.assign(n, Opened{});
    }
    ~DeviceTransport() override {
        cudaSetDevice(device_);
        for (auto* cache : {&opened_, &opened_resident_})
            for (Opened& o : *cache)
                if (o.mapped) cudaIpcCloseMemHandle(o.mapped);
        if (stream_) cudaStreamDestroy(stream_);
    }

    std::vector<std::vector<float>> exchange(const std::vector<std::vector<float>>& per_peer, int width) override {
        const int n = group_->size(), me = group_->rank();
        DUPLEX_CHECK_ARG(int(per_peer.size()) == n && width >= 1, "device exchange", "{} peers' rows of width {} for {} ranks",
                         per_peer.size(), width, n);
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        // The whole count matrix: counts[s][p] rows from s to p. Entering this collective also means every rank
        // finished reading what the previous exchange left in its receive buffer.
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
        grow_receive_buffer(size_t(recv_rows[me]) * width);
        upload_rows(per_peer, send_total);
        // Source-major: rank s's rows for p land after those of the ranks before s.
        std::vector<cuda::RowSegment> segments;
        std::vector<int64_t> landed(n, 0);
        for (int q = 0; q < n; ++q)
            for (int p = 0; p < n; ++p) {
                if (counts[q][p] > 0) segments.push_back({q, p, offsets[q][p], landed[p], counts[q][p]});
                landed[p] += counts[q][p];
            }
        run_segments(segments, send_.get(), recv_.get(), generation_, opened_, recv_rows, width);
        // Down: what arrived, source-major, straight into each source's vector.
        size_t from = 0;
        for (int s = 0; s < n; ++s) {
            out[s].resize(size_t(counts[s][me]) * width);
            recv_.download(out[s].data(), out[s].size(), cudaStreamPerThread, from);
            from += out[s].size();
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
        return out;
    }

    int rows_stay_on() const override { return device_; }

    // Dispatch (and the combine backward) with the rows staying on the device: each rank's rows go up once, grouped
    // by destination and expert, and land expert-major in a buffer of their own that the experts read.
    std::shared_ptr<ResidentRows> exchange_to_experts(const std::vector<std::vector<float>>& per_peer,
                                                      const std::vector<std::vector<int64_t>>& sent, int width) override {
        const int n = group_->size(), me = group_->rank();
        DUPLEX_CHECK_ARG(int(per_peer.size()) == n && width >= 1, "device exchange", "{} peers' rows of width {} for {} ranks",
                         per_peer.size(), width, n);
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        kernels::ExpertMajorPlan plan = gather_plan(sent);
        size_t send_total = 0;
        for (int p = 0; p < n; ++p) {
            int64_t rows = 0;
            for (int64_t c : sent[p]) rows += c;
            DUPLEX_CHECK_ARG(per_peer[p].size() == size_t(rows) * width, "device exchange",
                             "{} values for rank {}, which gets {} rows of {}", per_peer[p].size(), p, rows, width);
            send_total += per_peer[p].size();
        }
        upload_rows(per_peer, send_total);
        auto out = std::make_shared<DeviceRows>(plan.expert_first[me], width, device_);
        std::vector<cuda::RowSegment> segments;
        std::vector<int64_t> capacity(n);
        for (int r = 0; r < n; ++r) capacity[r] = plan.expert_first[r].back();
        for (const kernels::RowMove& m : plan.moves)
            segments.push_back({m.token, m.expert, m.token_row, m.expert_row, m.rows});
        // A fresh buffer each call (the experts keep it until their W pass): a new generation for its IPC handle.
        run_segments(segments, send_.get(), out->row(0), ++resident_generation_, opened_resident_, capacity, width);
        return out;
    }

    // Combine (and the dispatch backward) from rows on the device: each expert rank writes its rows straight into
    // the token ranks' receive buffers, in the order each token rank sent them; those come down once.
    std::vector<std::vector<float>> exchange_from_experts(const ResidentRows& rows, const std::vector<std::vector<int64_t>>& sent,
                                                          int width) override {
        const int n = group_->size(), me = group_->rank();
        DUPLEX_CUDA_CHECK(cudaSetDevice(device_));
        kernels::ExpertMajorPlan plan = gather_plan(sent);
        DUPLEX_CHECK_ARG(rows.first == plan.expert_first[me], "device exchange",
                         "{} expert rows here, the dispatch's counts say {}", rows.first.back(), plan.expert_first[me].back());
        const float* from = device_rows_of(rows, device_, width, "device exchange");
        grow_receive_buffer(size_t(plan.token_rows[me]) * width);
        std::vector<cuda::RowSegment> segments;
        for (const kernels::RowMove& m : plan.moves)
            segments.push_back({m.expert, m.token, m.expert_row, m.token_row, m.rows});
        run_segments(segments, from, recv_.get(), generation_, opened_, plan.token_rows, width);
        // Down: per expert rank, the rows it returned (this rank's buffer holds them grouped by expert rank).
        std::vector<std::vector<float>> out(n);
        size_t first = 0;
        for (int p = 0; p < n; ++p) {
            int64_t back = 0;
            for (int64_t c : sent[p]) back += c;
            out[p].resize(size_t(back) * width);
            recv_.download(out[p].data(), out[p].size(), cudaStreamPerThread, first);
            first += out[p].size();
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
        return out;
    }

private:
    // Why a peer's GPU cannot be reached from this rank's (empty: all can); enables peer access for the GPUs of
    // threads of this process (raw pointers).
    std::string unreachable_peer(const Whereabouts& mine) const {
        for (size_t r = 0; r < peers_.size(); ++r) {
            if (std::strcmp(peers_[r].bus_id, mine.bus_id) == 0) continue;
            int other = -1, ok = 0;
            if (cudaDeviceGetByPCIBusId(&other, peers_[r].bus_id) != cudaSuccess) {
                cudaGetLastError();
                return fmt::format("group rank {}'s GPU ({}) is not visible to this process (CUDA_VISIBLE_DEVICES)", r,
                                   peers_[r].bus_id);
            }
            if (cudaDeviceCanAccessPeer(&ok, device_, other) != cudaSuccess || !ok) {
                cudaGetLastError();
                return fmt::format("GPU {} ({}) cannot reach group rank {}'s GPU ({}): no peer access", device_,
                                   mine.bus_id, r, peers_[r].bus_id);
            }
            if (peers_[r].pid == mine.pid) {
                cudaError_t e = cudaDeviceEnablePeerAccess(other, 0);
                cudaGetLastError();
                if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled)
                    return fmt::format("cannot enable peer access to GPU {}: {}", other, cudaGetErrorString(e));
            }
        }
        return {};
    }

    // Up: this rank's rows (send_total values), grouped by destination, into send_.
    void upload_rows(const std::vector<std::vector<float>>& per_peer, size_t send_total) {
        if (send_.size() < send_total) send_ = cuda::DeviceArray<float>(send_total);
        size_t at = 0;
        for (const auto& rows : per_peer) {
            send_.upload(rows.data(), rows.size(), cudaStreamPerThread, at);
            at += rows.size();
        }
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
    }

    // recv_ holds at least `values` (a new allocation is a new generation for the peers' IPC mappings).
    void grow_receive_buffer(size_t values) {
        if (recv_.size() >= values) return;
        recv_ = cuda::DeviceArray<float>(values);
        ++generation_;
    }

    // Every rank's dispatch counts (sent[p][e] from each), and the expert-major plan they make.
    kernels::ExpertMajorPlan gather_plan(const std::vector<std::vector<int64_t>>& sent) {
        const int n = group_->size();
        const int E = sent.empty() ? 0 : int(sent[0].size());
        std::vector<int64_t> mine;
        for (const auto& per_expert : sent) {
            DUPLEX_CHECK_ARG(int(per_expert.size()) == E, "device exchange", "counts for {} and {} experts", E,
                             per_expert.size());
            mine.insert(mine.end(), per_expert.begin(), per_expert.end());
        }
        DUPLEX_CHECK_ARG(int(sent.size()) == n, "device exchange", "counts for {} ranks in a group of {}", sent.size(), n);
        std::vector<int64_t> all(size_t(n) * n * E);
        group_->all_gather(mine.data(), all.data(), mine.size() * sizeof(int64_t))->wait();
        std::vector<std::vector<std::vector<int64_t>>> c(n, std::vector<std::vector<int64_t>>(n));
        for (int q = 0; q < n; ++q)
            for (int s = 0; s < n; ++s)
                c[q][s].assign(all.begin() + long((size_t(q) * n + s) * E), all.begin() + long((size_t(q) * n + s + 1) * E));
        return kernels::plan_expert_major(c);
    }

    // Runs the group's `segments` (src and dst are group ranks): this rank reads `src` and receives into `dst` (of
    // `dst_generation`, for the peers' IPC mappings in `cache`); capacity[r]: rows of rank r's destination. Shared
    // mode: group rank 0 launches every segment with everyone's pointers; push mode: each rank launches the segments
    // it is the source of, into its peers' buffers. Returns once every rank's writes are done, or throws on all.
    void run_segments(const std::vector<cuda::RowSegment>& segments, const float* src, float* dst,
                      int64_t dst_generation, std::vector<Opened>& cache, const std::vector<int64_t>& capacity,
                      int width) {
        const int n = group_->size(), me = group_->rank();
        std::string failure;
        int64_t status = 0;
        auto attempt = [&](auto&& step) {
            if (status) return;
            try {
                step();
            } catch (const std::exception& e) {
                failure = e.what();
                status = 1;
            }
        };
        if (push_) {
            RecvBuffer mine;
            mine.pointer = int64_t(reinterpret_cast<uintptr_t>(dst));
            mine.generation = dst_generation;
            attempt([&] {
                if (dst) DUPLEX_CUDA_CHECK(cudaIpcGetMemHandle(&mine.handle, dst));
            });
            std::vector<RecvBuffer> theirs(n);
            group_->all_gather(&mine, theirs.data(), sizeof(mine))->wait();
            attempt([&] {
                std::vector<cuda::RowSegment> own;
                for (const cuda::RowSegment& g : segments)
                    if (g.src == me && g.rows > 0) own.push_back(g);
                if (own.empty()) return;
                std::vector<const float*> send(n, nullptr);
                send[me] = src;
                std::vector<float*> recv(n, nullptr);
                for (const cuda::RowSegment& g : own)
                    if (!recv[g.dst]) recv[g.dst] = g.dst == me ? dst : peer_buffer(g.dst, theirs[g.dst], cache);
                cuda::exchange_segments(send, recv, own, capacity, width, config_, stream_);
            });
        } else {
            int64_t ptrs[2] = {int64_t(reinterpret_cast<uintptr_t>(src)), int64_t(reinterpret_cast<uintptr_t>(dst))};
            std::vector<int64_t> all_ptrs(2 * size_t(n));
            group_->all_gather(ptrs, all_ptrs.data(), sizeof(ptrs))->wait();
            if (me == 0)
                attempt([&] {
                    std::vector<const float*> send(n);
                    std::vector<float*> recv(n);
                    for (int r = 0; r < n; ++r) {
                        send[r] = reinterpret_cast<const float*>(uintptr_t(all_ptrs[2 * r]));
                        recv[r] = reinterpret_cast<float*>(uintptr_t(all_ptrs[2 * r + 1]));
                    }
                    if (!segments.empty()) cuda::exchange_segments(send, recv, segments, capacity, width, config_, stream_);
                });
        }
        std::vector<int64_t> statuses(n);
        group_->all_gather(&status, statuses.data(), sizeof(status))->wait();
        for (int r = 0; r < n; ++r)
            if (statuses[r] != 0)
                throw CommError(r == me ? fmt::format("EP exchange on GPU {}: {}", device_, failure)
                                        : fmt::format("EP exchange on GPU {}: the kernel of group rank {} failed",
                                                      device_, r));
    }

    // Peer p's buffer `b` in this process's address space (`cache`: the mappings of that kind of buffer).
    float* peer_buffer(int p, const RecvBuffer& b, std::vector<Opened>& cache) {
        if (peers_[p].pid == int64_t(getpid())) return reinterpret_cast<float*>(uintptr_t(b.pointer));
        Opened& o = cache[p];
        if (o.mapped && o.generation != b.generation) {
            DUPLEX_CUDA_CHECK(cudaIpcCloseMemHandle(o.mapped));
            o.mapped = nullptr;
        }
        if (!o.mapped) {
            cudaError_t e = cudaIpcOpenMemHandle(&o.mapped, b.handle, cudaIpcMemLazyEnablePeerAccess);
            if (e != cudaSuccess) {
                cudaGetLastError();
                o.mapped = nullptr;
                throw CommError(fmt::format("cannot open group rank {}'s receive buffer (CUDA IPC handle from GPU {}): {}",
                                            p, peers_[p].bus_id, cudaGetErrorString(e)));
            }
            o.generation = b.generation;
        }
        return static_cast<float*>(o.mapped);
    }

    std::shared_ptr<Communicator> group_;
    int device_;
    cuda::ExchangeConfig config_;
    cudaStream_t stream_ = nullptr;  // this rank's (or, shared, rank 0's) kernels: a stream of their own
    cuda::DeviceArray<float> send_, recv_;
    std::vector<Whereabouts> peers_;
    bool push_ = false;            // separate processes (or GPUs): each rank pushes its rows through IPC mappings
    int64_t generation_ = 0;       // of recv_: bumped at each new allocation
    std::vector<Opened> opened_;   // per peer in another process: its mapped receive buffer
    std::vector<Opened> opened_resident_;  // ... and its latest expert-major buffer (a new one per dispatch)
    int64_t resident_generation_ = 0;
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
