#include "runtime/exec/trace.hpp"

#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace duplex {

const char* lane_name(Lane lane) {
    switch (lane) {
        case Lane::Compute: return "compute";
        case Lane::Comm: return "comm";
        case Lane::Optimizer: return "optimizer";
    }
    return "?";
}

Tracer::Tracer(int rank, bool enabled) : rank_(rank), enabled_(enabled) {}

double Tracer::now_us() const { return now_seconds() * 1e6; }

void Tracer::add(Lane lane, std::string name, double start_us, double end_us) {
    if (!enabled_) return;
    std::lock_guard<std::mutex> lock(mutex_);
    spans_.push_back({lane, std::move(name), start_us, end_us});
}

std::string Tracer::serialize() const {
    std::string out;
    for (const TraceSpan& s : spans_)
        out += fmt::format("{}\t{:.3f}\t{:.3f}\t{}\n", static_cast<int>(s.lane), s.start_us, s.end_us, s.name);
    return out;
}

void write_chrome_trace(const std::string& path, const std::vector<std::string>& per_rank) {
    nlohmann::json events = nlohmann::json::array();
    double origin = -1;
    std::vector<std::vector<TraceSpan>> spans(per_rank.size());
    for (size_t r = 0; r < per_rank.size(); ++r) {
        std::istringstream in(per_rank[r]);
        std::string line;
        while (std::getline(in, line)) {
            std::istringstream f(line);
            int lane;
            TraceSpan s;
            f >> lane >> s.start_us >> s.end_us;
            f.get();
            std::getline(f, s.name);
            s.lane = static_cast<Lane>(lane);
            if (origin < 0 || s.start_us < origin) origin = s.start_us;
            spans[r].push_back(s);
        }
    }
    for (size_t r = 0; r < spans.size(); ++r) {
        events.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", r}, {"args", {{"name", fmt::format("rank {}", r)}}}});
        for (Lane lane : {Lane::Compute, Lane::Comm, Lane::Optimizer})
            events.push_back({{"ph", "M"},
                              {"name", "thread_name"},
                              {"pid", r},
                              {"tid", static_cast<int>(lane)},
                              {"args", {{"name", lane_name(lane)}}}});
        for (const TraceSpan& s : spans[r])
            events.push_back({{"ph", "X"},
                              {"name", s.name},
                              {"cat", lane_name(s.lane)},
                              {"pid", r},
                              {"tid", static_cast<int>(s.lane)},
                              {"ts", s.start_us - origin},
                              {"dur", std::max(0.0, s.end_us - s.start_us)}});
    }
    std::ofstream out(path);
    if (!out) throw ConfigError("--trace", fmt::format("cannot write '{}'", path));
    out << nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
}

}  // namespace duplex
