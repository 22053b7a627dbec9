#include "runtime/model/batch.hpp"

#include "core/error.hpp"

namespace duplex {

MicrobatchData microbatch_data(Batch& b) {
    MicrobatchData d;
    Shape shape{b.sequences, b.seq_len};
    if (!b.tokens.empty()) d["tokens"] = TensorView::of(b.tokens, shape);
    if (!b.targets.empty()) d["targets"] = TensorView::of(b.targets, shape);
    return d;
}

Batch batch_from(const MicrobatchData* data, int sequences, int seq_len) {
    Batch b{sequences, seq_len, {}, {}};
    if (!data) return b;
    auto read = [&](const char* name, std::vector<int>& out) {
        auto it = data->find(name);
        if (it == data->end()) return;
        const TensorView& v = it->second;
        TensorSpec want{DType::I32, {sequences, seq_len}, Device::cpu()};
        DUPLEX_CHECK_ARG(v.spec() == want, "microbatch data", "'{}' is {}, the model reads {}", name, v.spec().str(),
                         want.str());
        const int* p = v.data<int>();
        out.assign(p, p + v.numel());
    };
    read("tokens", b.tokens);
    read("targets", b.targets);
    return b;
}

}  // namespace duplex
