#include "core/log.hpp"

#include <mutex>
#include <set>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>

#include "core/knobs.hpp"

namespace duplex::log {
namespace {

const Knob<std::string> kLogLevel("DUPLEX_LOG_LEVEL", "warn", "log level: trace, debug, info, warn, error, off");
const Knob<std::string> kLogSubsys("DUPLEX_LOG_SUBSYS", "", "comma-separated subsystems to log (empty: all)");

struct State {
    std::shared_ptr<spdlog::logger> logger;
    std::set<std::string, std::less<>> subsystems;
};

State& state() {
    static State s = [] {
        State st;
        st.logger = spdlog::stderr_color_mt("duplex");
        st.logger->set_pattern("%^%L%$ %H:%M:%S.%e %v");
        st.logger->set_level(spdlog::level::from_str(kLogLevel.get()));
        std::string list = kLogSubsys.get();
        size_t start = 0;
        while (start < list.size()) {
            size_t end = list.find(',', start);
            if (end == std::string::npos) end = list.size();
            if (end > start) st.subsystems.insert(list.substr(start, end - start));
            start = end + 1;
        }
        return st;
    }();
    return s;
}

}  // namespace

spdlog::logger& logger() { return *state().logger; }

bool enabled(spdlog::level::level_enum level, std::string_view subsystem) {
    State& s = state();
    if (!s.logger->should_log(level)) return false;
    return s.subsystems.empty() || s.subsystems.count(subsystem) > 0;
}

}  // namespace duplex::log
