// The EMA of the weights, kept in host memory and updated by a background thread (DeepSeek-V3 keeps its
// EMA on the CPU and updates it asynchronously after each step). submit() only copies a snapshot of the
// new weights into a staging buffer and returns; the thread folds it into the shadow while the next step
// runs. A submit that finds the previous update still running waits for it (one snapshot in flight).
//
//   CpuEma<float> ema({n0, n1}, /*decay=*/0.999);
//   ema.initialize({w0, w1});          // shadow = weights
//   ... after each optimizer step:  ema.submit({w0, w1});
//   ema.wait();  ema.shadow()[0] ...  // or ema.save("ema.bin")
#pragma once

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace duplex {

template <typename T>
class CpuEma {
public:
    CpuEma(std::vector<size_t> sizes, double decay);
    ~CpuEma();
    CpuEma(const CpuEma&) = delete;
    CpuEma& operator=(const CpuEma&) = delete;

    void initialize(const std::vector<const T*>& weights);
    void submit(const std::vector<const T*>& weights);
    void wait();
    const std::vector<std::vector<T>>& shadow();  // waits first
    double decay() const { return decay_; }
    long updates() const;
    // Writes the shadow (waits first): a small header, then each tensor's values.
    void save(const std::string& path);
    // Reads a file save() wrote into the shadow (waits first); ConfigError for another layout, dtype, or a
    // truncated file, leaving the shadow as it was.
    void load(const std::string& path);

private:
    void run();
    std::vector<size_t> sizes_;
    double decay_;
    std::vector<std::vector<T>> shadow_, staging_;
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    bool pending_ = false, stopping_ = false;
    long updates_ = 0;
    std::thread thread_;
};

}  // namespace duplex
