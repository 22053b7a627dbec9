// The memory ledger: live and peak bytes per category for one rank. Components report what they keep
// (activations stashed for backward, inputs kept for the deferred weight gradient, ...), so that a run can
// say where its peak memory went.
//
//   MemoryLedger ledger;
//   ledger.add("activations", bytes);  ...;  ledger.release("activations", bytes);
//   ledger.peak("activations");  ledger.peak_total();
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace duplex {

class MemoryLedger {
public:
    void add(const std::string& category, int64_t bytes);
    void release(const std::string& category, int64_t bytes);
    int64_t live(const std::string& category) const;
    int64_t peak(const std::string& category) const;
    int64_t live_total() const;
    int64_t peak_total() const;  // the peak of the sum, not the sum of peaks
    std::map<std::string, int64_t> peaks() const;
    void reset();

private:
    mutable std::mutex mutex_;
    std::map<std::string, int64_t> live_, peak_;
    int64_t live_total_ = 0, peak_total_ = 0;
};

}  // namespace duplex
