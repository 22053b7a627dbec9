// Per-rank timelines of compute and communication, written as one Chrome-trace / Perfetto JSON for all ranks
// (a process per rank, a lane per kind), so a person can see what overlapped with what.
//
//   Tracer t(rank);  { auto s = t.scope(Lane::Compute, "F mb 3 stage 1"); ... }
//   std::string blob = t.serialize();           // gather the blobs to one rank, then:
//   write_chrome_trace("trace.json", {blob0, blob1, ...});
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "core/clock.hpp"

namespace duplex {

enum class Lane { Compute, Comm, Optimizer };

struct TraceSpan {
    Lane lane;
    std::string name;
    double start_us, end_us;
};

class Tracer {
public:
    explicit Tracer(int rank, bool enabled = true);
    void add(Lane lane, std::string name, double start_us, double end_us);
    double now_us() const;  // microseconds on the process-wide steady clock

    class Scope {
    public:
        Scope(Tracer& t, Lane lane, std::string name) : t_(t), lane_(lane), name_(std::move(name)), start_(t.now_us()) {}
        ~Scope() { t_.add(lane_, std::move(name_), start_, t_.now_us()); }

    private:
        Tracer& t_;
        Lane lane_;
        std::string name_;
        double start_;
    };
    Scope scope(Lane lane, std::string name) { return Scope(*this, lane, std::move(name)); }

    const std::vector<TraceSpan>& spans() const { return spans_; }
    void clear() { spans_.clear(); }
    int rank() const { return rank_; }
    bool enabled() const { return enabled_; }
    std::string serialize() const;  // compact text, for gathering to one rank

private:
    int rank_;
    bool enabled_;
    std::mutex mutex_;  // spans may come from the two halves of an overlapped pair
    std::vector<TraceSpan> spans_;
};

// One Chrome-trace JSON from every rank's serialized spans (index = rank).
void write_chrome_trace(const std::string& path, const std::vector<std::string>& per_rank);
const char* lane_name(Lane lane);

}  // namespace duplex
