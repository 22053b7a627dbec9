#include "memory/ledger.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

void MemoryLedger::add(const std::string& category, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t& l = live_[category];
    l += bytes;
    peak_[category] = std::max(peak_[category], l);
    live_total_ += bytes;
    peak_total_ = std::max(peak_total_, live_total_);
}

void MemoryLedger::release(const std::string& category, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t& l = live_[category];
    if (bytes > l)
        throw Error(fmt::format("memory ledger: releasing {} bytes of '{}' with only {} live", bytes, category, l));
    l -= bytes;
    live_total_ -= bytes;
}

int64_t MemoryLedger::live(const std::string& category) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(category);
    return it == live_.end() ? 0 : it->second;
}

int64_t MemoryLedger::peak(const std::string& category) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = peak_.find(category);
    return it == peak_.end() ? 0 : it->second;
}

int64_t MemoryLedger::live_total() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_total_;
}

int64_t MemoryLedger::peak_total() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_total_;
}

std::map<std::string, int64_t> MemoryLedger::peaks() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
}

void MemoryLedger::reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    live_.clear();
    peak_.clear();
    live_total_ = peak_total_ = 0;
}

}  // namespace duplex
