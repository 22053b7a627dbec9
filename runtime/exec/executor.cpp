#include "runtime/exec/executor.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <thread>

#include <fmt/format.h>

#include "core/clock.hpp"

namespace duplex {

using sched::Chunk;
using sched::Instr;
using sched::Op;

std::pair<double, double> hidden_time(const std::vector<Interval>& comm, std::vector<Interval> compute) {
    std::sort(compute.begin(), compute.end(), [](const Interval& a, const Interval& b) { return a.start < b.start; });
    std::vector<Interval> merged;
    for (const Interval& c : compute) {
        if (!merged.empty() && c.start <= merged.back().end)
            merged.back().end = std::max(merged.back().end, c.end);
        else
            merged.push_back(c);
    }
    double hidden = 0, total = 0;
    for (const Interval& w : comm) {
        total += w.end - w.start;
        for (const Interval& c : merged) {
            if (c.start >= w.end) break;
            hidden += std::max(0.0, std::min(w.end, c.end) - std::max(w.start, c.start));
        }
    }
    return {hidden, total};
}

// ---- outside a step ----

void Stage::zero_grad() {
    for (StateBuffer& b : state())
        if (b.kind == StateKind::Parameter && b.grad.raw()) {
            DUPLEX_CHECK_ARG(b.grad.device().kind == Device::CPU, "zero_grad", "{} lives on {}; override zero_grad",
                             b.name, b.grad.device().str());
            std::memset(b.grad.raw(), 0, b.grad.nbytes());
        }
}

namespace {
// The context of Stage::prepare: no step runs, so waits are plain and there is no stream to share.
class PrepareContext : public StageContext {
public:
    explicit PrepareContext(ExpertService* experts) : experts_(experts) {}
    void wait(const WorkPtr& work, const std::string&) override { work->wait(); }
    void wait_for(const std::function<void()>& fn, const std::string&) override { fn(); }
    bool in_fb_pair() const override { return false; }
    void compute_begins() override {}
    ExpertService* experts() const override { return experts_; }

private:
    ExpertService* experts_;
};
}  // namespace

void Executor::prepare(const std::map<int, Stage*>& stages) {
    PrepareContext ctx(options_.experts.get());
    for (auto& [id, st] : stages) st->prepare(ctx);
}

// ---- one step ----

struct Executor::Run {
    Executor& ex;
    const std::map<int, Stage*>& stages;
    const std::function<const MicrobatchData*(int)>& data_of;
    int step, global_offset, last;
    ExecutorStep result;
    std::mutex mutex;                                    // result, local hand-overs
    std::map<std::tuple<int, int, bool>, Tensor> local;  // (mb, producer stage, gradient) -> tensor
    // The compute stream (exclusive_compute): a first-come, first-served ticket lock, so a half that gives way goes
    // behind the other half if it is waiting.
    std::mutex stream_mutex;
    std::condition_variable stream_cv;
    uint64_t next_ticket = 0, serving = 0;
    bool forward_only = false;  // run_forward: every call is an evaluation forward

    void acquire() {
        if (!ex.options_.exclusive_compute) return;
        std::unique_lock<std::mutex> lock(stream_mutex);
        uint64_t mine = next_ticket++;
        stream_cv.wait(lock, [&] { return serving == mine; });
    }
    void release() {
        if (!ex.options_.exclusive_compute) return;
        {
            std::lock_guard<std::mutex> lock(stream_mutex);
            ++serving;
        }
        stream_cv.notify_all();
    }
    bool waiting_for_stream() {
        std::lock_guard<std::mutex> lock(stream_mutex);
        return next_ticket > serving + 1;
    }
    void note_comm(const std::string& name, double t0, double t1, bool fb_expert) {
        ex.tracer_.add(Lane::Comm, name, t0, t1);
        std::lock_guard<std::mutex> lock(mutex);
        result.comm.push_back({t0, t1});
        if (fb_expert) result.fb_expert_comm.push_back({t0, t1});
    }

    // One stage call. Without exclusive_compute its compute is the call minus its waits. With it, the call takes
    // the rank's compute stream at each compute_begins() and holds it to its next wait (or its end): a wait
    // releases the stream and does not take it back (the half whose exchange finished may have nothing left to
    // compute, and its send must not wait for the other half; a call that opens with an exchange starts it at
    // once), and its compute is the time it held the stream.
    class Call : public StageContext {
    public:
        Call(Run& run, std::string name, bool in_fb) : run_(run), name_(std::move(name)), in_fb_(in_fb) {
            start_ = run_.ex.tracer_.now_us();
        }
        ~Call() override {
            double end = run_.ex.tracer_.now_us();
            drop();
            std::vector<Interval> pieces;
            if (exclusive()) {
                pieces = held_;
            } else {
                double t = start_;
                for (const Interval& w : waits_) {
                    if (w.start > t) pieces.push_back({t, w.start});
                    t = std::max(t, w.end);
                }
                if (end > t) pieces.push_back({t, end});
            }
            double busy = 0;
            for (const Interval& p : pieces) {
                run_.ex.tracer_.add(Lane::Compute, name_, p.start, p.end);
                busy += p.end - p.start;
            }
            std::lock_guard<std::mutex> lock(run_.mutex);
            run_.result.compute.insert(run_.result.compute.end(), pieces.begin(), pieces.end());
            run_.result.compute_us += busy;
        }
        void wait(const WorkPtr& work, const std::string& what) override {
            wait_for([&] { work->wait(); }, what);
        }
        void wait_for(const std::function<void()>& fn, const std::string& what) override {
            double t0 = run_.ex.tracer_.now_us();
            drop();
            fn();
            double t1 = run_.ex.tracer_.now_us();
            waits_.push_back({t0, t1});
            // The mark lets a trace reader find the expert exchanges of F&B pairs.
            run_.note_comm(in_fb_ ? what + " [F&B]" : what, t0, t1, in_fb_);
        }
        bool in_fb_pair() const override { return in_fb_; }
        ExpertService* experts() const override { return run_.ex.options_.experts.get(); }
        void compute_begins() override {
            if (!exclusive()) return;
            if (!holding_) return take();
            if (run_.waiting_for_stream()) drop(), take();  // the other half goes first
        }

    private:
        bool exclusive() const { return run_.ex.options_.exclusive_compute; }
        void take() {
            if (!exclusive() || holding_) return;
            run_.acquire();
            holding_ = true;
            held_from_ = run_.ex.tracer_.now_us();
        }
        void drop() {
            if (!holding_) return;
            double now = run_.ex.tracer_.now_us();
            if (now > held_from_) held_.push_back({held_from_, now});
            holding_ = false;
            run_.release();
        }
        Run& run_;
        std::string name_;
        bool in_fb_;
        double start_ = 0, held_from_ = 0;
        bool holding_ = false;
        std::vector<Interval> waits_, held_;
    };

    Stage& stage(int s) const {
        auto it = stages.find(s);
        if (it == stages.end())
            throw StageError(fmt::format("pipeline rank {}: the schedule runs stage {} here but no stage was built for it",
                                         ex.prank_, s));
        return *it->second;
    }
    Microbatch micro(const Chunk& c, bool needs_data) const {
        Microbatch m;
        m.forward_only = forward_only;
        m.id = c.mb;
        m.global = global_offset + c.mb;
        m.step = step;
        m.data = needs_data && data_of ? data_of(c.mb) : nullptr;
        return m;
    }
    void check(const Stage& st, const Microbatch& m, const char* what, const Tensor& got, const TensorSpec& want) {
        if (!want.admits(got.spec()))
            throw StageError(fmt::format("{}, microbatch {}: {} returned {}, expected {}", st.name(), m.id, what,
                                         got.defined() || got.is_meta() ? got.spec().str() : "no tensor", want.str()));
    }

    // The producer's tensor: from a peer (p2p_of lists it) or from this rank's own earlier chunk.
    Tensor take(const std::vector<sched::P2P>& p2p, const Chunk& producer, bool gradient, const TensorSpec& spec) {
        for (const sched::P2P& t : p2p)
            if (!t.send && t.gradient == gradient) {
                double t0 = ex.tracer_.now_us();
                Tensor v = spec.announced() ? ex.transport_.recv_announced(spec, t.peer, t.tag)
                                            : ex.transport_.recv(spec, t.peer, t.tag);
                note_comm(fmt::format("recv {} mb {} from stage {}", gradient ? "grad" : "act", producer.mb,
                                      producer.stage),
                          t0, ex.tracer_.now_us(), false);
                return v;
            }
        std::lock_guard<std::mutex> lock(mutex);
        auto it = local.find({producer.mb, producer.stage, gradient});
        if (it == local.end())
            throw StageError(fmt::format("pipeline rank {}: {} of microbatch {} stage {} neither received nor produced "
                                         "here",
                                         ex.prank_, gradient ? "gradient" : "activation", producer.mb, producer.stage));
        Tensor v = std::move(it->second);
        local.erase(it);
        if (!spec.admits(v.spec()))
            throw StageError(fmt::format("pipeline rank {}: stage {} hands over {} for microbatch {}, stage {} expects {}",
                                         ex.prank_, producer.stage, v.spec().str(), producer.mb,
                                         gradient ? producer.stage - 1 : producer.stage + 1, spec.str()));
        return v;
    }
    // `announced`: the receiver's spec leaves dimensions to the sender (TensorSpec::kAnnounced).
    void give(const std::vector<sched::P2P>& p2p, const Chunk& producer, bool gradient, Tensor&& t, bool announced) {
        for (const sched::P2P& x : p2p)
            if (x.send && x.gradient == gradient) {
                if (announced)
                    ex.transport_.send_announced(t, x.peer, x.tag);
                else
                    ex.transport_.send(t, x.peer, x.tag);
                return;
            }
        std::lock_guard<std::mutex> lock(mutex);
        local[{producer.mb, producer.stage, gradient}] = std::move(t);
    }

    // One chunk in three phases: receive its input, compute, check and send its output. An F&B pair receives
    // both inputs before either half computes and sends both outputs after both have computed, as DualPipe's
    // overlapped pair does (and as the schedule replay and the simulator model it).
    struct ChunkRun {
        Chunk c;
        bool backward = false, with_weight = false;
        Stage* st = nullptr;
        Microbatch m;
        std::vector<sched::P2P> p2p;
        Tensor in, out;
        double loss = 0;
    };
    ChunkRun receive(const Instr& instr, const Chunk& c, bool backward, bool with_weight) {
        ChunkRun r;
        r.c = c, r.backward = backward, r.with_weight = with_weight;
        r.st = &stage(c.stage);
        r.p2p = sched::p2p_of(ex.schedule_, ex.prank_, instr);
        r.m = micro(c, !backward && (c.stage == 0 || c.stage == last));
        if (!backward && c.stage > 0) r.in = take(r.p2p, {c.mb, c.stage - 1, c.dir}, false, r.st->input_spec(r.m));
        if (backward && c.stage < last) r.in = take(r.p2p, {c.mb, c.stage + 1, c.dir}, true, r.st->output_spec(r.m));
        return r;
    }
    void compute(ChunkRun& r, bool in_fb) {
        const Chunk& c = r.c;
        Microbatch& m = r.m;
        if (!r.backward) {
            Call call(*this, fmt::format("F mb {} stage {}", c.mb, c.stage), in_fb);
            m.ctx = &call;
            r.out = r.st->forward(m, r.in.view());
            if (c.stage == last) r.loss = r.st->loss(m);
        } else {
            Call call(*this, fmt::format("{} mb {} stage {}", r.with_weight ? "BW" : "B", c.mb, c.stage), in_fb);
            m.ctx = &call;
            m.weight_follows = r.with_weight;
            r.out = r.st->backward_input(m, r.in.view());
            m.weight_follows = false;
            if (r.with_weight) r.st->backward_weight(m);
        }
        m.ctx = nullptr;
        r.in = Tensor();
    }
    void send(ChunkRun& r) {
        if (!r.backward && r.c.stage == last) {
            std::lock_guard<std::mutex> lock(mutex);
            result.losses[r.c.mb] = r.loss;
        } else if (!r.backward) {
            TensorSpec want = r.st->output_spec(r.m);
            check(*r.st, r.m, "forward", r.out, want);
            give(r.p2p, r.c, false, std::move(r.out), want.announced());
        } else if (r.c.stage > 0) {
            TensorSpec want = r.st->input_spec(r.m);
            check(*r.st, r.m, "backward_input", r.out, want);
            give(r.p2p, r.c, true, std::move(r.out), want.announced());
        }
    }
    void chunk(const Instr& instr, const Chunk& c, bool backward, bool with_weight) {
        ChunkRun r = receive(instr, c, backward, with_weight);
        compute(r, false);
        send(r);
    }

    void weight(const Chunk& c) {
        Stage& st = stage(c.stage);
        Microbatch m = micro(c, false);
        Call call(*this, fmt::format("W mb {} stage {}", c.mb, c.stage), false);
        m.ctx = &call;
        st.backward_weight(m);
    }
};

Executor::Executor(const sched::Schedule& schedule, int pipe_rank, PipeTransport& transport, Tracer& tracer,
                   ExecutorOptions options)
    : schedule_(schedule), prank_(pipe_rank), transport_(transport), tracer_(tracer), options_(options) {
    DUPLEX_CHECK_ARG(pipe_rank >= 0 && pipe_rank < schedule.num_ranks, "executor", "pipeline rank {} of a {}-rank schedule",
                     pipe_rank, schedule.num_ranks);
    const std::vector<Instr>& list = schedule.ranks[pipe_rank];
    for (size_t i = 0; i < list.size(); ++i)
        if (list[i].op == Op::W || list[i].op == Op::BW || list[i].op == Op::FB) last_weight_[list[i].b.stage] = i;
}

ExecutorStep Executor::run(const std::map<int, Stage*>& stages,
                           const std::function<const MicrobatchData*(int)>& data_of, int step, int global_offset) {
    Run r{*this, stages, data_of, step, global_offset, schedule_.pp - 1, {}, {}, {}, {}, {}, false};
    double start = tracer_.now_us();
    const std::vector<Instr>& list = schedule_.ranks[prank_];
    for (size_t i = 0; i < list.size(); ++i) {
        const Instr& in = list[i];
        // Right after the compute that finishes a stage's last weight gradient, before its sends.
        auto weights_done = [&] {
            if (options_.on_weights_done)
                for (auto& [stage, at] : last_weight_)
                    if (at == i) options_.on_weights_done(stage);
        };
        auto full_backward = [&] {
            Run::ChunkRun b = r.receive(in, in.b, true, true);
            r.compute(b, false);
            weights_done();
            r.send(b);
        };
        switch (in.op) {
            case Op::F: r.chunk(in, in.f, false, false); break;
            case Op::B: r.chunk(in, in.b, true, false); break;
            case Op::BW: full_backward(); break;
            case Op::W:
                r.weight(in.b);
                weights_done();
                break;
            case Op::FB: {
                if (in.f.stage == in.b.stage || !options_.overlap_pairs) {  // one thread: the calls in order
                    r.chunk(in, in.f, false, false);
                    full_backward();
                    break;
                }
                Run::ChunkRun f = r.receive(in, in.f, false, false), b = r.receive(in, in.b, true, true);
                // The forward on a helper thread, the backward here: whichever waits (a dispatch or a combine)
                // lets the other compute. Two different stages: a stage never sees concurrent calls.
                std::exception_ptr failed;
                std::thread helper([&] {
                    try {
                        r.compute(f, true);
                    } catch (...) {
                        failed = std::current_exception();
                    }
                });
                try {
                    r.compute(b, true);
                } catch (...) {
                    helper.join();
                    throw;
                }
                helper.join();
                if (failed) std::rethrow_exception(failed);
                weights_done();
                r.send(f);
                r.send(b);
                break;
            }
        }
    }
    {
        auto span = tracer_.scope(Lane::Comm, "drain sends");
        transport_.drain();
    }
    r.result.schedule_us = tracer_.now_us() - start;
    return std::move(r.result);
}

ExecutorStep Executor::run_forward(const std::map<int, Stage*>& stages,
                                   const std::function<const MicrobatchData*(int)>& data_of, int step,
                                   int global_offset) {
    Run r{*this, stages, data_of, step, global_offset, schedule_.pp - 1, {}, {}, {}, {}, {}, false};
    r.forward_only = true;
    double start = tracer_.now_us();
    for (const Instr& in : schedule_.ranks[prank_])
        if (in.op == Op::F || in.op == Op::FB) r.chunk(in, in.f, false, false);
    {
        auto span = tracer_.scope(Lane::Comm, "drain sends");
        transport_.drain();
    }
    r.result.schedule_us = tracer_.now_us() - start;
    return std::move(r.result);
}

}  // namespace duplex
