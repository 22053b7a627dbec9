#include "runtime/train/data.hpp"

#include <cmath>
#include <fstream>
#include <numeric>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"

#include <cstring>

namespace duplex {

SyntheticTask::SyntheticTask(int vocab, int seq_len, uint64_t seed) : vocab_(vocab), seq_len_(seq_len) {
    DUPLEX_CHECK_ARG(vocab >= 2 && seq_len >= 1, "task", "vocab {} and seq_len {} must be positive", vocab, seq_len);
    Rng rng(seed ^ 0x5eed7a5cull);
    for (auto& p : perm_) {
        p.resize(vocab);
        std::iota(p.begin(), p.end(), 0);
        for (int i = vocab - 1; i > 0; --i) std::swap(p[i], p[rng.below(uint64_t(i) + 1)]);
    }
}

int SyntheticTask::target_of(int previous, int current) const { return perm_[current % 2][previous]; }

Batch SyntheticTask::batch(int sequences, uint64_t seed, double zipf_skew) const {
    Batch b;
    b.sequences = sequences;
    b.seq_len = seq_len_;
    Rng rng(seed);
    std::vector<double> cdf;
    if (zipf_skew > 0) {
        double sum = 0;
        for (int v = 0; v < vocab_; ++v) cdf.push_back(sum += 1.0 / std::pow(v + 1.0, zipf_skew));
        for (double& c : cdf) c /= sum;
    }
    auto draw = [&] {
        if (cdf.empty()) return int(rng.below(uint64_t(vocab_)));
        double u = rng.uniform();
        return int(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    };
    for (int s = 0; s < sequences; ++s) {
        int prev = -1;
        for (int t = 0; t < seq_len_; ++t) {
            int x = std::min(draw(), vocab_ - 1);
            b.tokens.push_back(x);
            b.targets.push_back(target_of(prev < 0 ? x : prev, prev < 0 ? 0 : x));
            prev = x;
        }
    }
    return b;
}

uint64_t batch_seed(uint64_t seed, int step, int global) {
    return (seed * 1000003ull + uint64_t(step)) * 1009ull + uint64_t(global);
}

SyntheticBatches::SyntheticBatches(int vocab, int seq_len, int sequences, uint64_t seed, double zipf_skew)
    : task_(vocab, seq_len, seed), sequences_(sequences), seed_(seed), skew_(zipf_skew) {}

Batch SyntheticBatches::batch(int step, int global) const {
    return task_.batch(sequences_, batch_seed(seed_, step, global), skew_);
}

std::string SyntheticBatches::describe() const {
    return skew_ > 0 ? fmt::format("the synthetic task (Zipf token skew {})", skew_) : "the synthetic task";
}

TokenFileBatches::TokenFileBatches(const std::string& path, int bytes_per_token, int vocab, int seq_len, int sequences,
                                   uint64_t seed)
    : path_(path), seq_len_(seq_len), sequences_(sequences), seed_(seed) {
    DUPLEX_CHECK_ARG(bytes_per_token == 2 || bytes_per_token == 4, "--data", "{}: token ids are u16 or u32, not {} bytes",
                     path, bytes_per_token);
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw ConfigError("--data", fmt::format("{}: cannot open", path));
    auto bytes = static_cast<size_t>(in.tellg());
    DUPLEX_CHECK_ARG(bytes % size_t(bytes_per_token) == 0, "--data", "{}: {} bytes is not a whole number of u{} ids",
                     path, bytes, bytes_per_token * 8);
    size_t n = bytes / size_t(bytes_per_token);
    DUPLEX_CHECK_ARG(n >= size_t(seq_len) + 1, "--data", "{}: {} token ids, fewer than one window of {} + 1", path, n,
                     seq_len);
    std::vector<char> raw(bytes);
    in.seekg(0);
    in.read(raw.data(), std::streamsize(bytes));
    ids_.resize(n);
    for (size_t i = 0; i < n; ++i) {
        uint32_t v = 0;
        if (bytes_per_token == 2) {
            uint16_t h;
            std::memcpy(&h, raw.data() + 2 * i, 2);
            v = h;
        } else {
            std::memcpy(&v, raw.data() + 4 * i, 4);
        }
        if (v >= uint32_t(vocab))
            throw ConfigError("--data", fmt::format("{}: token {} at position {} is outside the model's vocabulary of {}",
                                                    path, v, i, vocab));
        ids_[i] = int(v);
    }
}

Batch TokenFileBatches::batch(int step, int global) const {
    Batch b;
    b.sequences = sequences_;
    b.seq_len = seq_len_;
    Rng rng(batch_seed(seed_, step, global));
    uint64_t windows = ids_.size() - size_t(seq_len_);  // starts 0 .. size - seq_len - 1
    for (int s = 0; s < sequences_; ++s) {
        size_t at = size_t(rng.below(windows));
        b.tokens.insert(b.tokens.end(), ids_.begin() + long(at), ids_.begin() + long(at) + seq_len_);
        b.targets.insert(b.targets.end(), ids_.begin() + long(at) + 1, ids_.begin() + long(at) + seq_len_ + 1);
    }
    return b;
}

std::string TokenFileBatches::describe() const { return fmt::format("{} ({} tokens)", path_, ids_.size()); }

std::unique_ptr<BatchSource> make_batch_source(const std::string& spec, int vocab, int seq_len, int sequences,
                                               uint64_t seed, double zipf_skew) {
    if (spec.empty() || spec == "synthetic")
        return std::make_unique<SyntheticBatches>(vocab, seq_len, sequences, seed, zipf_skew);
    std::string path = spec;
    int bytes = 2;
    if (auto colon = spec.rfind(':'); colon != std::string::npos) {
        std::string kind = spec.substr(colon + 1);
        if (kind == "u16" || kind == "u32") {
            bytes = kind == "u16" ? 2 : 4;
            path = spec.substr(0, colon);
        }
    }
    return std::make_unique<TokenFileBatches>(path, bytes, vocab, seq_len, sequences, seed);
}

}  // namespace duplex
