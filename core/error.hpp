// Duplex's error types. Every error is thrown at the first place the problem is known and its message
// names what went wrong: the rank, the operation and the bad value where they apply.
//
//   throw ConfigError("--pp", fmt::format("must be even for DualPipe, got {}", pp));
//   throw TimeoutError(comm_error_context(rank, "all_to_all_v", peer), timeout_s);
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace duplex {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Invalid configuration or arguments: names the option and the bad value.
class ConfigError : public Error {
public:
    ConfigError(const std::string& option, const std::string& problem)
        : Error(fmt::format("invalid {}: {}", option, problem)) {}
};

// A communication operation failed (transport error, peer failure, malformed message).
class CommError : public Error {
public:
    using Error::Error;
};

// An operation did not complete within its deadline.
class TimeoutError : public CommError {
public:
    TimeoutError(const std::string& context, double timeout_s)
        : CommError(fmt::format("timeout after {:.3g} s: {}", timeout_s, context)) {}
};

// Training stopped: too many steps in a row had a loss or a gradient norm that is not finite (none of them was
// applied). The message is the last step's report.
class DivergenceError : public Error {
public:
    using Error::Error;
};

// The rendezvous store rejected or failed a request.
class StoreError : public Error {
public:
    using Error::Error;
};

// "rank 3: all_to_all_v with peer 5" — the context string used by comm errors.
inline std::string comm_context(int rank, const char* op, int peer = -1) {
    if (peer < 0) return fmt::format("rank {}: {}", rank, op);
    return fmt::format("rank {}: {} with peer {}", rank, op, peer);
}

// Wraps a C API call that returns an error code; expands the call text, file and line into the error.
[[noreturn]] void throw_api_error(const char* api, const char* call, long code, const char* detail, const char* file,
                                  int line);

}  // namespace duplex

#define DUPLEX_CHECK_ARG(cond, option, ...)                                        \
    do {                                                                           \
        if (!(cond)) throw ::duplex::ConfigError((option), fmt::format(__VA_ARGS__)); \
    } while (0)
