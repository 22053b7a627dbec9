// Monotonic time and a deterministic RNG: the one timer and the one random source of the project.
//
//   duplex::Stopwatch sw;  ...;  double s = sw.seconds();
//   duplex::Rng rng(seed);  uint64_t x = rng.next();  double u = rng.uniform();
#pragma once

#include <chrono>
#include <cstdint>

namespace duplex {

using Clock = std::chrono::steady_clock;

double now_seconds();  // seconds since an arbitrary fixed point (steady clock), shared by threads and processes
void sleep_until_seconds(double t);  // blocks until now_seconds() reaches t (emulate mode's timed waits)

class Stopwatch {
public:
    Stopwatch() : start_(Clock::now()) {}
    void reset() { start_ = Clock::now(); }
    double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

private:
    Clock::time_point start_;
};

// Deadline helper: `Deadline d(timeout_s); ... if (d.expired()) ...`; a non-positive timeout never expires.
class Deadline {
public:
    explicit Deadline(double timeout_s);
    bool expired() const { return !infinite_ && Clock::now() >= at_; }
    double timeout_s() const { return timeout_s_; }
    Clock::time_point at() const { return at_; }
    bool infinite() const { return infinite_; }

private:
    double timeout_s_;
    bool infinite_;
    Clock::time_point at_;
};

// xoshiro256** seeded through splitmix64: same seed, same stream, on every platform.
class Rng {
public:
    explicit Rng(uint64_t seed);
    uint64_t next();
    double uniform();                  // [0, 1)
    uint64_t below(uint64_t bound);    // [0, bound)
    double normal();                   // standard normal (Box–Muller)

private:
    uint64_t s_[4];
};

}  // namespace duplex
