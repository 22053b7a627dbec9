// Typed environment knobs, each declared once beside the code that reads it, with a default and help text.
//
//   const duplex::Knob<double> kTimeout("DUPLEX_COMM_TIMEOUT", 300.0, "seconds before a comm op times out");
//   double t = kTimeout.get();   // the environment's value, or the default
//
// Every knob registers itself; `duplex <cmd> --print-config` lists them with their effective values.
#pragma once

#include <string>
#include <vector>

namespace duplex {

struct KnobInfo {
    std::string name;
    std::string default_value;
    std::string value;  // effective value (environment, else default)
    std::string help;
};

// All knobs registered so far, sorted by name.
std::vector<KnobInfo> all_knobs();

namespace detail {
void register_knob(const char* name, std::string (*current)(const void*), const void* self, std::string def,
                   const char* help);
const char* knob_env(const char* name);
template <typename T>
T parse_knob(const char* name, const char* text);
template <>
int parse_knob<int>(const char* name, const char* text);
template <>
long parse_knob<long>(const char* name, const char* text);
template <>
double parse_knob<double>(const char* name, const char* text);
template <>
bool parse_knob<bool>(const char* name, const char* text);
template <>
std::string parse_knob<std::string>(const char* name, const char* text);
std::string knob_to_string(int v);
std::string knob_to_string(long v);
std::string knob_to_string(double v);
std::string knob_to_string(bool v);
std::string knob_to_string(const std::string& v);
}  // namespace detail

template <typename T>
class Knob {
public:
    Knob(const char* name, T default_value, const char* help) : name_(name), default_(std::move(default_value)) {
        detail::register_knob(
            name, [](const void* self) { return detail::knob_to_string(static_cast<const Knob*>(self)->get()); },
            this, detail::knob_to_string(default_), help);
    }
    // The environment's value if set (a malformed value throws ConfigError naming the variable), else the default.
    T get() const {
        const char* text = detail::knob_env(name_);
        return text ? detail::parse_knob<T>(name_, text) : default_;
    }
    const char* name() const { return name_; }
    const T& default_value() const { return default_; }

private:
    const char* name_;
    T default_;
};

}  // namespace duplex
