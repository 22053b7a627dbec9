// Emulate mode's pipeline transport: what the executor sends carries its size, not its payload, and arrives after
// the link's modelled time (runtime/sim/cost_model.hpp).
//
//   TimedPipeTransport t(pipe, CostModel::preset("h800"));
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "runtime/exec/pipe_transport.hpp"
#include "runtime/sim/cost_model.hpp"

namespace duplex {

// Sizes without payloads (emulate mode): each transfer is a 16-byte header (send time, bytes); the receiver
// holds it until send time + latency + bytes / bandwidth of the link between the two ranks, from the cost
// model. The steady clock is shared by threads and by processes on one host.
class TimedPipeTransport : public PipeTransport {
public:
    TimedPipeTransport(std::shared_ptr<Communicator> pipe, const CostModel& cost) : pipe_(std::move(pipe)), cost_(cost) {}
    ~TimedPipeTransport() override;
    void send(const Tensor& t, int peer, uint32_t tag) override;
    Tensor recv(const TensorSpec& spec, int peer, uint32_t tag) override;
    void drain() override;

private:
    std::shared_ptr<Communicator> pipe_;
    const CostModel& cost_;
    std::mutex mutex_;
    std::vector<std::pair<WorkPtr, std::shared_ptr<std::vector<double>>>> pending_;
};

}  // namespace duplex
