#include "memory/ema.hpp"

#include <cstring>
#include <fstream>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

template <typename T>
CpuEma<T>::CpuEma(std::vector<size_t> sizes, double decay) : sizes_(std::move(sizes)), decay_(decay) {
    DUPLEX_CHECK_ARG(decay >= 0 && decay < 1, "--ema-decay", "must be in [0, 1), got {}", decay);
    for (size_t n : sizes_) {
        shadow_.emplace_back(n, T(0));
        staging_.emplace_back(n, T(0));
    }
    thread_ = std::thread([this] { run(); });
}

template <typename T>
CpuEma<T>::~CpuEma() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
}

template <typename T>
void CpuEma<T>::initialize(const std::vector<const T*>& weights) {
    wait();
    DUPLEX_CHECK_ARG(weights.size() == sizes_.size(), "ema", "{} tensors given, {} expected", weights.size(), sizes_.size());
    for (size_t i = 0; i < sizes_.size(); ++i) std::memcpy(shadow_[i].data(), weights[i], sizes_[i] * sizeof(T));
}

template <typename T>
void CpuEma<T>::submit(const std::vector<const T*>& weights) {
    DUPLEX_CHECK_ARG(weights.size() == sizes_.size(), "ema", "{} tensors given, {} expected", weights.size(), sizes_.size());
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return !pending_; });
    for (size_t i = 0; i < sizes_.size(); ++i) std::memcpy(staging_[i].data(), weights[i], sizes_[i] * sizeof(T));
    pending_ = true;
    cv_.notify_all();
}

template <typename T>
void CpuEma<T>::wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return !pending_; });
}

template <typename T>
const std::vector<std::vector<T>>& CpuEma<T>::shadow() {
    wait();
    return shadow_;
}

template <typename T>
long CpuEma<T>::updates() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return updates_;
}

template <typename T>
void CpuEma<T>::run() {
    for (;;) {
        {
            std::unique_lock<std::mutex> lock(mutex_);
            cv_.wait(lock, [&] { return stopping_ || pending_; });
            if (!pending_) return;
        }
        // NOTE: staging_ is not touched by submit() while pending_ is set, so the update runs unlocked.
        for (size_t i = 0; i < sizes_.size(); ++i) {
            T* s = shadow_[i].data();
            const T* w = staging_[i].data();
            for (size_t j = 0; j < sizes_[i]; ++j) s[j] = T(decay_ * s[j] + (1 - decay_) * w[j]);
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            pending_ = false;
            ++updates_;
        }
        cv_.notify_all();
    }
}

template <typename T>
void CpuEma<T>::save(const std::string& path) {
    wait();
    std::ofstream out(path, std::ios::binary);
    if (!out) throw ConfigError("ema path", fmt::format("cannot write '{}'", path));
    uint64_t header[3] = {0x44555045414d4131ull /* "DUPEAMA1" */, sizeof(T), sizes_.size()};
    out.write(reinterpret_cast<const char*>(header), sizeof(header));
    for (size_t i = 0; i < sizes_.size(); ++i) {
        uint64_t n = sizes_[i];
        out.write(reinterpret_cast<const char*>(&n), sizeof(n));
        out.write(reinterpret_cast<const char*>(shadow_[i].data()), std::streamsize(n * sizeof(T)));
    }
    if (!out) throw Error(fmt::format("writing the EMA to '{}' failed", path));
}

template <typename T>
void CpuEma<T>::load(const std::string& path) {
    wait();
    std::ifstream in(path, std::ios::binary);
    if (!in) throw ConfigError("ema path", fmt::format("cannot read '{}'", path));
    uint64_t header[3] = {0, 0, 0};
    in.read(reinterpret_cast<char*>(header), sizeof(header));
    if (!in || header[0] != 0x44555045414d4131ull)
        throw ConfigError("ema path", fmt::format("'{}' is not an EMA file", path));
    if (header[1] != sizeof(T) || header[2] != sizes_.size())
        throw ConfigError("ema path", fmt::format("'{}' holds {} tensors of {}-byte values; this EMA has {} of {}", path,
                                                  header[2], header[1], sizes_.size(), sizeof(T)));
    std::vector<std::vector<T>> values(sizes_.size());
    for (size_t i = 0; i < sizes_.size(); ++i) {
        uint64_t n = 0;
        in.read(reinterpret_cast<char*>(&n), sizeof(n));
        if (!in || n != sizes_[i])
            throw ConfigError("ema path", fmt::format("'{}': tensor {} has {} values, this EMA's has {}", path, i, n,
                                                      sizes_[i]));
        values[i].resize(n);
        in.read(reinterpret_cast<char*>(values[i].data()), std::streamsize(n * sizeof(T)));
        if (!in) throw ConfigError("ema path", fmt::format("'{}' is truncated in tensor {}", path, i));
    }
    if (in.peek() != std::char_traits<char>::eof())
        throw ConfigError("ema path", fmt::format("'{}' has bytes after its last tensor", path));
    std::lock_guard<std::mutex> lock(mutex_);
    shadow_ = std::move(values);
}

template class CpuEma<float>;
template class CpuEma<double>;

}  // namespace duplex
