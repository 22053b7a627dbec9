// Comma-separated command-line lists ("4,8,16"), shared by duplex simulate, duplex commbench and duplex_bench_gpu.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex::tools {

inline std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream in(s);
    for (std::string item; std::getline(in, item, ',');)
        if (!item.empty()) out.push_back(item);
    return out;
}

// ConfigError naming `flag` unless every item is an integer and there is at least one.
inline std::vector<int> int_list(const std::string& s, const char* flag) {
    std::vector<int> out;
    for (const std::string& item : split_list(s)) {
        try {
            size_t used = 0;
            out.push_back(std::stoi(item, &used));
            if (used != item.size()) throw std::invalid_argument(item);
        } catch (const std::exception&) {
            throw ConfigError(flag, fmt::format("'{}' is not a comma-separated list of integers", s));
        }
    }
    if (out.empty()) throw ConfigError(flag, "needs at least one value");
    return out;
}

}  // namespace duplex::tools
