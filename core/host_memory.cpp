#include "core/host_memory.hpp"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/knobs.hpp"

namespace duplex {

namespace {

const Knob<std::string> kMemoryLimit("DUPLEX_MEMORY_LIMIT", "",
                                     "bytes (K/M/G suffixes) commands may plan to allocate; empty: what the machine "
                                     "and its cgroup have available");

bool read_number(const std::string& path, uint64_t& out) {
    std::ifstream in(path);
    std::string s;
    if (!(in >> s) || s == "max") return false;
    try {
        out = std::stoull(s);
    } catch (const std::exception&) {
        return false;
    }
    return true;
}

}  // namespace

HostMemory host_memory() {
    std::string forced = kMemoryLimit.get();
    if (!forced.empty()) return {parse_size(forced, "DUPLEX_MEMORY_LIMIT"), "DUPLEX_MEMORY_LIMIT"};
    HostMemory m{~uint64_t(0), "unknown"};
    std::ifstream meminfo("/proc/meminfo");
    std::string line;
    while (std::getline(meminfo, line))
        if (line.rfind("MemAvailable:", 0) == 0) {
            std::istringstream in(line.substr(13));
            uint64_t kb = 0;
            in >> kb;
            m = {kb * 1024, "MemAvailable in /proc/meminfo"};
        }
    uint64_t limit = 0, used = 0;
    if (read_number("/sys/fs/cgroup/memory.max", limit) && read_number("/sys/fs/cgroup/memory.current", used)) {
        uint64_t left = limit > used ? limit - used : 0;
        if (left < m.available) m = {left, "the cgroup's memory.max - memory.current"};
    } else if (read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes", limit) &&
               read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes", used) && limit < (uint64_t(1) << 60)) {
        uint64_t left = limit > used ? limit - used : 0;
        if (left < m.available) m = {left, "the cgroup's memory limit - usage"};
    }
    return m;
}

size_t parse_size(const std::string& text, const char* flag) {
    size_t pos = 0;
    double v = 0;
    try {
        v = std::stod(text, &pos);
    } catch (const std::exception&) {
        throw ConfigError(flag, fmt::format("expected a size like 1024, 64K or 16M, got '{}'", text));
    }
    std::string unit = text.substr(pos);
    double mult = 1;
    if (unit == "K" || unit == "k" || unit == "KiB") mult = 1024;
    else if (unit == "M" || unit == "m" || unit == "MiB") mult = 1024.0 * 1024;
    else if (unit == "G" || unit == "g" || unit == "GiB") mult = 1024.0 * 1024 * 1024;
    else if (!unit.empty()) throw ConfigError(flag, fmt::format("unknown unit '{}' in '{}' (K, M, G)", unit, text));
    if (v < 0) throw ConfigError(flag, fmt::format("size must not be negative, got '{}'", text));
    return static_cast<size_t>(v * mult);
}

std::string human_bytes(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    while (b >= 1024 && u < 5) b /= 1024, ++u;
    return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.3g} {}", b, units[u]);
}

void check_host_memory(double estimate, const std::string& option, const std::string& what) {
    HostMemory m = host_memory();
    if (estimate <= double(m.available)) return;
    throw ConfigError(option, fmt::format("needs about {} ({}), but only {} is available ({}); set "
                                          "DUPLEX_MEMORY_LIMIT to override",
                                          human_bytes(estimate), what, human_bytes(double(m.available)), m.source));
}

}  // namespace duplex
