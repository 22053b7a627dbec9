#include "comm/store.hpp"

#include <chrono>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex {

int64_t store_parse_int(const std::string& key, const std::string& value) {
    if (value.empty()) return 0;
    size_t pos = 0;
    int64_t v = 0;
    try {
        v = std::stoll(value, &pos);
    } catch (const std::exception&) {
        pos = 0;
    }
    if (pos != value.size()) throw StoreError(fmt::format("store add on '{}': value '{}' is not an integer", key, value));
    return v;
}

std::string Store::get(const std::string& key, double timeout_s) {
    Deadline deadline(timeout_s);
    for (int attempt = 0;; ++attempt) {
        if (auto v = try_get(key)) return *v;
        if (deadline.expired()) throw TimeoutError(fmt::format("store get of key '{}'", key), timeout_s);
        double remaining = deadline.infinite()
                               ? 1.0
                               : std::chrono::duration<double>(deadline.at() - Clock::now()).count();
        wait_for_change(key, remaining, attempt);
    }
}

void Store::wait(const std::vector<std::string>& keys, double timeout_s) {
    Deadline deadline(timeout_s);
    for (const std::string& key : keys) {
        try {
            double remaining = deadline.infinite()
                                   ? 0.0
                                   : std::max(1e-6, std::chrono::duration<double>(deadline.at() - Clock::now()).count());
            get(key, remaining);
        } catch (const TimeoutError&) {
            std::vector<std::string> missing;
            for (const std::string& k : keys)
                if (!try_get(k)) missing.push_back(k);
            throw TimeoutError(fmt::format("store wait for keys [{}]", fmt::join(missing, ", ")), timeout_s);
        }
    }
}

void InMemoryStore::set(const std::string& key, const std::string& value) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        data_[key] = value;
    }
    changed_.notify_all();
}

std::optional<std::string> InMemoryStore::try_get(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = data_.find(key);
    if (it == data_.end()) return std::nullopt;
    return it->second;
}

int64_t InMemoryStore::add(const std::string& key, int64_t delta) {
    int64_t v;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        std::string& slot = data_[key];
        v = store_parse_int(key, slot) + delta;
        slot = std::to_string(v);
    }
    changed_.notify_all();
    return v;
}

std::string InMemoryStore::compare_set(const std::string& key, const std::string& expected, const std::string& desired) {
    std::string result;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = data_.find(key);
        if (it == data_.end()) {
            if (!expected.empty()) return std::string();
            data_[key] = desired;
            result = desired;
        } else {
            if (it->second == expected) it->second = desired;
            result = it->second;
        }
    }
    changed_.notify_all();
    return result;
}

void InMemoryStore::wait_for_change(const std::string& key, double remaining_s, int) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait_for(lock, std::chrono::duration<double>(std::min(remaining_s, 1.0)),
                      [&] { return data_.count(key) > 0; });
}

}  // namespace duplex
