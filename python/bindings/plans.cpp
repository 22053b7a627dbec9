// duplex._duplex, plans: schedules generated, validated and replayed (duplex.schedule), the stages a rank holds,
// and the simulator (duplex.simulate).
#include <cmath>

#include "python/bindings/common.hpp"

#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <fmt/format.h>

#include "parallel/schedule.hpp"
#include "runtime/model/config.hpp"
#include "runtime/sim/simulator.hpp"

namespace duplex::py {

using namespace nb::literals;

namespace {

struct Plan {
    sched::Schedule schedule;
    sched::Replay replay;
    sched::Costs costs;
    std::string kind;
    bool whole_costs = false;  // every cost a whole number: times come back as Python ints, like int arithmetic

    nb::object time(double t) const {
        if (whole_costs && std::nearbyint(t) == t) return nb::int_(static_cast<long long>(t));
        return nb::float_(t);
    }
    nb::list times(const std::vector<double>& ts) const {
        nb::list l;
        for (double t : ts) l.append(time(t));
        return l;
    }
};

nb::tuple chunk_tuple(const sched::Chunk& c) { return nb::make_tuple(c.mb, c.stage, c.dir); }

}  // namespace

void bind_simulate(nb::module_& m);

void bind_plans(nb::module_& m) {
    nb::class_<Plan>(m, "Plan", "A validated schedule replayed with given costs: per-rank instruction lists and timings.")
        .def_prop_ro("kind", [](const Plan& p) { return p.kind; })
        .def_prop_ro("pp", [](const Plan& p) { return p.schedule.pp; })
        .def_prop_ro("num_ranks", [](const Plan& p) { return p.schedule.num_ranks; })
        .def_prop_ro("vpp", [](const Plan& p) { return p.schedule.vpp; }, "model stages per rank (interleaved)")
        .def_prop_ro("microbatches", [](const Plan& p) { return p.schedule.num_microbatches; })
        .def_prop_ro("makespan", [](const Plan& p) { return p.time(p.replay.makespan); },
                     "end of the last instruction, in the costs' unit (an int when every cost is a whole number)")
        .def_prop_ro("idle", [](const Plan& p) { return p.times(p.replay.idle); }, "idle time per rank")
        .def_prop_ro("busy", [](const Plan& p) { return p.times(p.replay.busy); }, "busy time per rank")
        .def_prop_ro("peak_activations", [](const Plan& p) { return p.replay.peak_activations; },
                     "per rank: microbatch-chunks alive at once")
        .def_prop_ro("param_copies", [](const Plan& p) { return p.replay.param_copies; })
        .def_prop_ro("formula_bubble",
                     [](const Plan& p) { return p.time(sched::formula_bubble(p.schedule.kind, p.schedule.pp, p.costs, p.schedule.vpp));
                     },
                     "the published bubble per rank for these costs")
        .def_prop_ro(
            "instructions",
            [](const Plan& p) {
                nb::list ranks;
                for (const auto& list : p.schedule.ranks) {
                    nb::list l;
                    for (const sched::Instr& in : list) {
                        nb::object f = nb::none(), b = nb::none();
                        if (in.op == sched::Op::F || in.op == sched::Op::FB) f = chunk_tuple(in.f);
                        if (in.op != sched::Op::F) b = chunk_tuple(in.b);
                        l.append(nb::make_tuple(std::string(sched::op_name(in.op)), f, b));
                    }
                    ranks.append(l);
                }
                return ranks;
            },
            "per rank, in execution order: (op, forward chunk or None, backward chunk or None); a chunk is "
            "(microbatch, stage, direction)")
        .def_prop_ro("svg", [](const Plan& p) { return sched::render_svg(p.schedule, p.replay, p.costs); })
        .def_prop_ro("text", [](const Plan& p) { return sched::render_text(p.schedule, p.replay); })
        .def("__repr__", [](const Plan& p) {
            return fmt::format("<duplex.Plan {} pp={} ranks={} microbatches={} makespan={:g}>", p.kind, p.schedule.pp,
                               p.schedule.num_ranks, p.schedule.num_microbatches, p.replay.makespan);
        });

    m.def(
        "stages_of_rank",
        [](const std::string& schedule, int pp, int rank, int vpp) {
            return sched::stages_of_rank(sched::kind_from_name(schedule), pp, rank, vpp);
        },
        "schedule"_a, "pp"_a, "rank"_a, "vpp"_a = 1,
        "The model stages pipeline rank `rank` holds under `schedule` (1f1b, zb1p, dualpipe, dualpipev, interleaved) "
        "with `pp` stages, its own first: [r] for 1f1b and zb1p, [r, pp-1-r] for dualpipe and dualpipev, "
        "[r, r + pp/vpp, ...] for interleaved.");

    m.def(
        "schedule",
        [](const std::string& kind, int pp, int microbatches, double cost_f, double cost_b, double cost_w,
           double cost_fb, double p2p, int vpp) {
            Plan p;
            p.kind = kind;
            p.costs = {cost_f, cost_b, cost_w, cost_fb, p2p};
            sched::check_costs(p.costs);
            p.whole_costs = true;
            for (double c : {cost_f, cost_b, cost_w, cost_fb, p2p}) p.whole_costs = p.whole_costs && std::nearbyint(c) == c;
            p.schedule = sched::generate(sched::kind_from_name(kind), pp, microbatches, vpp);
            p.replay = sched::replay(p.schedule, p.costs);
            return p;
        },
        "kind"_a, "pp"_a, "microbatches"_a, nb::kw_only(), "cost_f"_a = 1.0, "cost_b"_a = 2.0, "cost_w"_a = 1.0,
        "cost_fb"_a = -1.0, "p2p"_a = 0.0, "vpp"_a = 1,
        "Generates, validates and replays a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev, interleaved). pp "
        "counts model stages (interleaved: pp/vpp ranks, vpp stages each). cost_b is a full backward, cost_w its "
        "weight-gradient part, cost_fb an overlapped forward+backward pair (< 0: F + B).");

    bind_simulate(m);
}

// duplex._duplex._simulate_json: what duplex.simulate (python/duplex/__init__.py) wraps.
void bind_simulate(nb::module_& m) {
    m.def(
        "_simulate_json",
        [](const std::string& model, const std::string& cluster, int pp, int ep, const std::string& schedule,
           int microbatches, int global_batch, int mb_sequences, bool fp8, bool recompute, const std::string& dispatch,
           const std::string& partition, int comm_sms, double elem_bytes, const std::string& device, int gpus,
           int gpus_per_node, bool sequential_hops, bool ignore_memory, bool free_comm, int vpp, int tp, int cp, int etp,
           int seq_len, bool serial_grad_sync) {
            ModelConfig mc = ModelConfig::preset(model);
            ClusterConfig cl = make_cluster(cluster, device, gpus, gpus_per_node);
            SimOptions o;
            o.schedule = sched::kind_from_name(schedule);
            o.pp = pp, o.vpp = vpp, o.ep = ep, o.microbatches = microbatches, o.global_batch = global_batch;
            o.tp = tp, o.cp = cp, o.etp = etp, o.seq_len = seq_len, o.overlap_grad_sync = !serial_grad_sync;
            o.mb_sequences = mb_sequences, o.fp8 = fp8, o.recompute = recompute, o.dispatch = dispatch;
            o.partition = partition, o.comm_sms = comm_sms, o.elem_bytes = elem_bytes;
            o.pipelined_hops = !sequential_hops, o.ignore_memory = ignore_memory, o.free_communication = free_comm;
            SimResult r;
            {
                nb::gil_scoped_release release;
                r = simulate(mc, cl, o);
            }
            return simulation_json(r, mc, cl, schedule, r.fits || ignore_memory);
        },
        "model"_a, "cluster"_a, "pp"_a, "ep"_a, "schedule"_a, "microbatches"_a, "global_batch"_a, "mb_sequences"_a,
        "fp8"_a, "recompute"_a, "dispatch"_a, "partition"_a, "comm_sms"_a, "elem_bytes"_a, "device"_a, "gpus"_a,
        "gpus_per_node"_a, "sequential_hops"_a, "ignore_memory"_a, "free_comm"_a, "vpp"_a = 1, "tp"_a = 1, "cp"_a = 1,
        "etp"_a = 1, "seq_len"_a = 0, "serial_grad_sync"_a = false);
}

}  // namespace duplex::py
