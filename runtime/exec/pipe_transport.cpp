#include "runtime/exec/pipe_transport.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

namespace {
// The announcement: dtype, rank, then the dimensions (int64 each).
constexpr int64_t kHeaderWords = 2 + PipeTransport::kMaxAnnouncedDims;
}  // namespace

void PipeTransport::send_announced(const Tensor& t, int peer, uint32_t tag) {
    DUPLEX_CHECK_ARG(tag < kAnnounceBit, "pipeline send", "tag {}: announced tensors take tags below {}", tag, kAnnounceBit);
    DUPLEX_CHECK_ARG(t.shape().size() <= size_t(kMaxAnnouncedDims), "pipeline send",
                     "{}: at most {} dimensions can be announced", t.spec().str(), kMaxAnnouncedDims);
    Tensor header = Tensor::zeros(DType::I64, {kHeaderWords});
    int64_t* h = header.data<int64_t>();
    h[0] = int64_t(t.dtype()), h[1] = int64_t(t.shape().size());
    for (size_t i = 0; i < t.shape().size(); ++i) h[2 + i] = t.shape()[i];
    send(header, peer, tag | kAnnounceBit);
    send(t, peer, tag);
}

Tensor PipeTransport::recv_announced(const TensorSpec& spec, int peer, uint32_t tag) {
    Tensor header = recv({DType::I64, {kHeaderWords}, Device::cpu()}, peer, tag | kAnnounceBit);
    const int64_t* h = header.data<int64_t>();
    if (h[1] < 0 || h[1] > kMaxAnnouncedDims || h[0] < 0 || h[0] > int64_t(DType::U8))
        throw Error(fmt::format("pipeline receive from rank {}: a damaged announcement (dtype {}, {} dimensions)", peer,
                                h[0], h[1]));
    TensorSpec got{DType(h[0]), Shape(h + 2, h + 2 + h[1]), spec.device};
    if (!spec.admits(got))
        throw ConfigError("pipeline receive", fmt::format("rank {} announced {}, this stage expects {}", peer, got.str(),
                                                          spec.str()));
    return recv(got, peer, tag);
}

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
