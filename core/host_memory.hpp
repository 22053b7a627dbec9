// Byte sizes on the command line, and how much host memory a command may take, and the refusal when its estimate does not fit: every command
// estimates what it is about to allocate (buffers x ranks, parameters, activations) before allocating it, so an
// input that cannot be meant is an error within a second instead of the out-of-memory killer a minute later.
//
//   check_host_memory(ranks * 2 * max_bytes, "-e", fmt::format("{} ranks x 2 buffers of {}", ranks, max));
//   // ConfigError: "invalid -e: needs about 128 GiB (8 ranks x 2 buffers of 8 GiB), but only 21.3 GiB is
//   //               available (MemAvailable in /proc/meminfo)"
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace duplex {

struct HostMemory {
    uint64_t available = 0;  // bytes this process may still take
    std::string source;      // where that came from
};

// The smaller of MemAvailable (/proc/meminfo) and what the process's cgroup (v2 memory.max - memory.current, or
// v1 limit - usage) leaves; DUPLEX_MEMORY_LIMIT (bytes, K/M/G suffixes) overrides both.
HostMemory host_memory();

// "1.5 GiB", "640 KiB", "12 B"
std::string human_bytes(double bytes);
// Bytes from "1024", "64K", "16M", "8G" (KiB-style suffixes too); ConfigError naming `flag` otherwise.
size_t parse_size(const std::string& text, const char* flag);

// ConfigError naming `option` when `estimate` bytes exceed what is available; `what` explains the estimate.
void check_host_memory(double estimate, const std::string& option, const std::string& what);

}  // namespace duplex
