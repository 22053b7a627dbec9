#include "core/error.hpp"

namespace duplex {

void throw_api_error(const char* api, const char* call, long code, const char* detail, const char* file, int line) {
    throw CommError(fmt::format("{} call failed ({} = {}{}{}) at {}:{}", api, call, code, detail ? ": " : "",
                                detail ? detail : "", file, line));
}

}  // namespace duplex
