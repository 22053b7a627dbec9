#include "core/knobs.hpp"

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {
namespace {

struct Entry {
    const char* name;
    std::string (*current)(const void*);
    const void* self;
    std::string default_value;
    const char* help;
};

std::mutex& registry_mutex() {
    static std::mutex m;
    return m;
}
std::vector<Entry>& registry() {
    static std::vector<Entry> r;
    return r;
}

}  // namespace

namespace detail {

void register_knob(const char* name, std::string (*current)(const void*), const void* self, std::string def,
                   const char* help) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    registry().push_back({name, current, self, std::move(def), help});
}

const char* knob_env(const char* name) {
    const char* v = std::getenv(name);
    return (v && *v) ? v : nullptr;
}

template <>
long parse_knob<long>(const char* name, const char* text) {
    char* end = nullptr;
    long v = std::strtol(text, &end, 10);
    if (end == text || *end != '\0') throw ConfigError(name, fmt::format("expected an integer, got '{}'", text));
    return v;
}
template <>
int parse_knob<int>(const char* name, const char* text) {
    return static_cast<int>(parse_knob<long>(name, text));
}
template <>
double parse_knob<double>(const char* name, const char* text) {
    char* end = nullptr;
    double v = std::strtod(text, &end);
    if (end == text || *end != '\0') throw ConfigError(name, fmt::format("expected a number, got '{}'", text));
    return v;
}
template <>
bool parse_knob<bool>(const char* name, const char* text) {
    std::string t(text);
    std::transform(t.begin(), t.end(), t.begin(), ::tolower);
    if (t == "1" || t == "true" || t == "yes" || t == "on") return true;
    if (t == "0" || t == "false" || t == "no" || t == "off") return false;
    throw ConfigError(name, fmt::format("expected a boolean (0/1/true/false), got '{}'", text));
}
template <>
std::string parse_knob<std::string>(const char*, const char* text) {
    return text;
}
std::string knob_to_string(int v) { return std::to_string(v); }
std::string knob_to_string(long v) { return std::to_string(v); }
std::string knob_to_string(double v) { return fmt::format("{}", v); }
std::string knob_to_string(bool v) { return v ? "1" : "0"; }
std::string knob_to_string(const std::string& v) { return v; }

}  // namespace detail

std::vector<KnobInfo> all_knobs() {
    std::vector<KnobInfo> out;
    {
        std::lock_guard<std::mutex> lock(registry_mutex());
        for (const Entry& e : registry()) {
            std::string value;
            try {
                value = e.current(e.self);
            } catch (const Error& err) {
                value = fmt::format("<{}>", err.what());
            }
            out.push_back({e.name, e.default_value, value, e.help});
        }
    }
    std::sort(out.begin(), out.end(), [](const KnobInfo& a, const KnobInfo& b) { return a.name < b.name; });
    return out;
}

}  // namespace duplex
