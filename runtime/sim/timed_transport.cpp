#include "runtime/sim/timed_transport.hpp"

#include <fmt/format.h>

#include "core/clock.hpp"
#include "runtime/exec/stage.hpp"

namespace duplex {

TimedPipeTransport::~TimedPipeTransport() { withdraw_sends(pending_); }

void TimedPipeTransport::send(const Tensor& t, int peer, uint32_t tag) {
    auto header = std::make_shared<std::vector<double>>(2);
    (*header)[0] = now_seconds();
    (*header)[1] = double(t.nbytes());
    WorkPtr w = pipe_->isend(header->data(), 2 * sizeof(double), peer, tag);
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back({std::move(w), header});
}

Tensor TimedPipeTransport::recv(const TensorSpec& spec, int peer, uint32_t tag) {
    double header[2];
    pipe_->irecv(header, sizeof(header), peer, tag)->wait();
    if (header[1] != double(spec.nbytes()))
        throw StageError(fmt::format("pipeline rank {}: {} bytes arrived from rank {} where {} ({} bytes) was expected",
                                     pipe_->rank(), header[1], peer, spec.str(), spec.nbytes()));
    sleep_until_seconds(header[0] + cost_.transfer_s(header[1], pipe_->topology().link(peer, pipe_->rank())));
    return Tensor::meta(spec.dtype, spec.shape, spec.device);
}

void TimedPipeTransport::drain() {
    std::vector<std::pair<WorkPtr, std::shared_ptr<std::vector<double>>>> all;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        all.swap(pending_);
    }
    for (auto& [w, h] : all) w->wait();
}

}  // namespace duplex
