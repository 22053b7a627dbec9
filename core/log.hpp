// Logging through spdlog with a subsystem tag per line ("[comm] ...").
//
// DUPLEX_LOG_LEVEL=trace|debug|info|warn|error|off selects the level (default: warn).
// DUPLEX_LOG_SUBSYS=comm,store limits output to those subsystems (default: all).
//
//   duplex::log::info("comm", "rank {} connected to {}", rank, peer);
#pragma once

#include <string_view>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace duplex::log {

spdlog::logger& logger();
bool enabled(spdlog::level::level_enum level, std::string_view subsystem);

template <typename... Args>
void write(spdlog::level::level_enum level, std::string_view subsystem, fmt::format_string<Args...> f,
           Args&&... args) {
    if (!enabled(level, subsystem)) return;
    logger().log(level, "[{}] {}", subsystem, fmt::format(f, std::forward<Args>(args)...));
}

template <typename... Args>
void debug(std::string_view s, fmt::format_string<Args...> f, Args&&... a) {
    write(spdlog::level::debug, s, f, std::forward<Args>(a)...);
}
template <typename... Args>
void info(std::string_view s, fmt::format_string<Args...> f, Args&&... a) {
    write(spdlog::level::info, s, f, std::forward<Args>(a)...);
}
template <typename... Args>
void warn(std::string_view s, fmt::format_string<Args...> f, Args&&... a) {
    write(spdlog::level::warn, s, f, std::forward<Args>(a)...);
}
template <typename... Args>
void error(std::string_view s, fmt::format_string<Args...> f, Args&&... a) {
    write(spdlog::level::err, s, f, std::forward<Args>(a)...);
}

}  // namespace duplex::log
