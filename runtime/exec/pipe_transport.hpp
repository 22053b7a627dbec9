// How activations and gradients travel between pipeline ranks: the transport the executor sends and receives
// through. Math mode moves real payloads over a communicator (CommPipeTransport, here); emulate mode moves
// sizes and delivers them after the link's modelled time (runtime/sim/timed_transport.hpp).
//
//   CommPipeTransport t(pipe);   t.send(x, /*peer=*/1, tag);   Tensor y = t.recv(spec, 0, tag);   t.drain();
#pragma once

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "core/tensor.hpp"

namespace duplex {

// How activations and gradients travel between pipeline ranks.
class PipeTransport {
public:
    virtual ~PipeTransport() = default;
    // Starts sending `t` to `peer`; the transport keeps `t` alive until drain().
    virtual void send(const Tensor& t, int peer, uint32_t tag) = 0;
    // Blocks until the tensor of `spec` from `peer` is here.
    virtual Tensor recv(const TensorSpec& spec, int peer, uint32_t tag) = 0;
    // Waits for every send started so far.
    virtual void drain() = 0;

    // A tensor whose shape the receiver does not know ahead (a spec with TensorSpec::kAnnounced dimensions): a
    // small header with its dtype and shape goes first (under the tag with kAnnounceBit set), then the tensor.
    // recv_announced checks the announcement against `spec` (ConfigError naming both when it does not fit). Tags
    // of announced tensors stay below kAnnounceBit (the schedule's tags for up to half a million chunks).
    static constexpr uint32_t kAnnounceBit = kMaxUserTag >> 1;
    static constexpr int kMaxAnnouncedDims = 8;
    void send_announced(const Tensor& t, int peer, uint32_t tag);
    Tensor recv_announced(const TensorSpec& spec, int peer, uint32_t tag);
};

// Real payloads over a communicator (math mode).
class CommPipeTransport : public PipeTransport {
public:
    explicit CommPipeTransport(std::shared_ptr<Communicator> pipe) : pipe_(std::move(pipe)) {}
    ~CommPipeTransport() override;  // cancels sends still in flight (a step that failed) before freeing them
    void send(const Tensor& t, int peer, uint32_t tag) override;
    Tensor recv(const TensorSpec& spec, int peer, uint32_t tag) override;
    void drain() override;

private:
    std::shared_ptr<Communicator> pipe_;
    std::mutex mutex_;
    std::vector<std::pair<WorkPtr, Tensor>> pending_;
};

// After a failed step, sends may still be queued at (or being copied by) a peer that will never take them: a
// short wait cancels what is queued and lets a copy under way finish, so no peer reads freed memory. For a
// transport's destructor; `pending` holds (work, what keeps its buffer alive) pairs.
template <typename Pending>
void withdraw_sends(Pending& pending) {
    for (auto& entry : pending) {
        try {
            entry.first->wait(1e-3);
        } catch (...) {
        }
    }
    pending.clear();
}

}  // namespace duplex
