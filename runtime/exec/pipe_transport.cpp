#include "runtime/exec/pipe_transport.hpp"

#include "core/error.hpp"

namespace duplex {

CommPipeTransport::~CommPipeTransport() { withdraw_sends(pending_); }

void CommPipeTransport::send(const Tensor& t, int peer, uint32_t tag) {
    DUPLEX_CHECK_ARG(!t.is_meta(), "pipeline send", "a meta tensor {} has no payload; math mode sends data",
                     t.spec().str());
    WorkPtr w = pipe_->isend(t.raw(), t.nbytes(), peer, tag);
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back({std::move(w), t});
}

Tensor CommPipeTransport::recv(const TensorSpec& spec, int peer, uint32_t tag) {
    Tensor t = Tensor::empty(spec.dtype, spec.shape);
    pipe_->irecv(t.raw(), t.nbytes(), peer, tag)->wait();
    return t;
}

void CommPipeTransport::drain() {
    std::vector<std::pair<WorkPtr, Tensor>> all;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        all.swap(pending_);
    }
    for (auto& [w, t] : all) w->wait();
}

}  // namespace duplex
