// Rendezvous key-value store (c10d-style): ranks publish and fetch small values to find each other.
// Two implementations: InMemoryStore (ranks as threads of one process) and TcpStore (comm/tcp_store.hpp).
//
//   store.set("ucx/addr/3", bytes);
//   std::string a = store.get("ucx/addr/5", 30.0);   // waits up to 30 s for the key, else TimeoutError
//   int64_t n = store.add("arrived", 1);              // atomic counter
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace duplex {

class Store {
public:
    virtual ~Store() = default;
    virtual void set(const std::string& key, const std::string& value) = 0;
    // The value of `key`, waiting until it exists; TimeoutError after timeout_s (<= 0: wait forever).
    std::string get(const std::string& key, double timeout_s);
    // The value of `key` now, if it exists.
    virtual std::optional<std::string> try_get(const std::string& key) = 0;
    // Adds delta to the integer at `key` (0 when absent) and returns the new value.
    virtual int64_t add(const std::string& key, int64_t delta) = 0;
    // Sets `key` to `desired` if its value is `expected` (an absent key matches an empty `expected`);
    // returns the value after the operation.
    virtual std::string compare_set(const std::string& key, const std::string& expected,
                                    const std::string& desired) = 0;
    // Waits until all keys exist; TimeoutError naming the missing ones after timeout_s.
    void wait(const std::vector<std::string>& keys, double timeout_s);

protected:
    // Blocks until `key` may have changed or the deadline passes (polling stores return after a backoff).
    virtual void wait_for_change(const std::string& key, double remaining_s, int attempt) = 0;
};

class InMemoryStore : public Store {
public:
    void set(const std::string& key, const std::string& value) override;
    std::optional<std::string> try_get(const std::string& key) override;
    int64_t add(const std::string& key, int64_t delta) override;
    std::string compare_set(const std::string& key, const std::string& expected, const std::string& desired) override;

protected:
    void wait_for_change(const std::string& key, double remaining_s, int attempt) override;

private:
    std::mutex mutex_;
    std::condition_variable changed_;
    std::map<std::string, std::string> data_;
};

// Shared integer helpers for the value layout of add(): decimal text.
int64_t store_parse_int(const std::string& key, const std::string& value);

}  // namespace duplex
