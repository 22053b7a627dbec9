// duplex._duplex: the Python face of the library (nanobind). Schedules as validated plans, the simulator, and
// the communicator over NumPy arrays and CPU tensors (any DLPack-capable array, zero-copy). Waits release the
// GIL, so in-process ranks (threads) run their Python code and their communication side by side.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <fmt/format.h>

#include "comm/launch.hpp"
#include "core/error.hpp"
#include "parallel/plan.hpp"
#include "parallel/schedule.hpp"
#include "runtime/model/config.hpp"
#include "runtime/simulator.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace duplex {
namespace {

struct Plan {
    sched::Schedule schedule;
    sched::Replay replay;
    sched::Costs costs;
    std::string kind;
};

using Array = nb::ndarray<nb::c_contig, nb::device::cpu>;

DType dtype_of_array(const Array& a) {
    nb::dlpack::dtype t = a.dtype();
    if (t == nb::dtype<float>()) return DType::F32;
    if (t == nb::dtype<double>()) return DType::F64;
    if (t == nb::dtype<int32_t>()) return DType::I32;
    if (t == nb::dtype<int64_t>()) return DType::I64;
    if (t == nb::dtype<uint8_t>()) return DType::U8;
    throw ConfigError("array", fmt::format("dtype (code {}, {} bits) is not float32/64, int32/64 or uint8", int(t.code),
                                           int(t.bits)));
}
size_t bytes_of(const Array& a) { return a.nbytes(); }

// A blocking wait with the GIL released.
void wait(const WorkPtr& w) {
    nb::gil_scoped_release release;
    w->wait();
}

nb::tuple chunk_tuple(const sched::Chunk& c) { return nb::make_tuple(c.mb, c.stage, c.dir); }

}  // namespace
}  // namespace duplex

NB_MODULE(_duplex, m) {
    using namespace duplex;
    m.doc() = "Duplex: DualPipe, expert parallelism and ZeRO-1 (C++ core).";

    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const ConfigError& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        } catch (const TimeoutError& e) {
            PyErr_SetString(PyExc_TimeoutError, e.what());
        } catch (const Error& e) {
            PyErr_SetString(PyExc_RuntimeError, e.what());
        }
    });

    nb::class_<Plan>(m, "Plan", "A validated schedule replayed with given costs: per-rank instruction lists and timings.")
        .def_prop_ro("kind", [](const Plan& p) { return p.kind; })
        .def_prop_ro("pp", [](const Plan& p) { return p.schedule.pp; })
        .def_prop_ro("num_ranks", [](const Plan& p) { return p.schedule.num_ranks; })
        .def_prop_ro("microbatches", [](const Plan& p) { return p.schedule.num_microbatches; })
        .def_prop_ro("makespan", [](const Plan& p) { return p.replay.makespan; })
        .def_prop_ro("idle", [](const Plan& p) { return p.replay.idle; }, "idle time per rank")
        .def_prop_ro("busy", [](const Plan& p) { return p.replay.busy; }, "busy time per rank")
        .def_prop_ro("peak_activations", [](const Plan& p) { return p.replay.peak_activations; },
                     "per rank: microbatch-chunks alive at once")
        .def_prop_ro("param_copies", [](const Plan& p) { return p.replay.param_copies; })
        .def_prop_ro("formula_bubble",
                     [](const Plan& p) { return sched::formula_bubble(p.schedule.kind, p.schedule.pp, p.costs); },
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
        "schedule",
        [](const std::string& kind, int pp, int microbatches, double cost_f, double cost_b, double cost_w,
           double cost_fb, double p2p) {
            Plan p;
            p.kind = kind;
            p.costs = {cost_f, cost_b, cost_w, cost_fb, p2p};
            sched::check_costs(p.costs);
            p.schedule = sched::generate(sched::kind_from_name(kind), pp, microbatches);
            p.replay = sched::replay(p.schedule, p.costs);
            return p;
        },
        "kind"_a, "pp"_a, "microbatches"_a, nb::kw_only(), "cost_f"_a = 1.0, "cost_b"_a = 2.0, "cost_w"_a = 1.0,
        "cost_fb"_a = -1.0, "p2p"_a = 0.0,
        "Generates, validates and replays a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev). cost_b is a full "
        "backward, cost_w its weight-gradient part, cost_fb an overlapped forward+backward pair (< 0: F + B).");

    m.def(
        "_simulate_json",
        [](const std::string& model, const std::string& cluster, int pp, int ep, const std::string& schedule,
           int microbatches, int global_batch, int mb_sequences, bool fp8, bool recompute, const std::string& dispatch,
           const std::string& partition, int comm_sms, double elem_bytes, const std::string& device, int gpus,
           int gpus_per_node, bool sequential_hops, bool ignore_memory, bool free_comm) {
            ModelConfig mc = ModelConfig::preset(model);
            ClusterConfig cl = make_cluster(cluster, device, gpus, gpus_per_node);
            SimOptions o;
            o.schedule = sched::kind_from_name(schedule);
            o.pp = pp, o.ep = ep, o.microbatches = microbatches, o.global_batch = global_batch;
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
        "gpus_per_node"_a, "sequential_hops"_a, "ignore_memory"_a, "free_comm"_a);

    nb::class_<Communicator>(m, "Communicator",
                             "A group of ranks. Operations block until done (the GIL is released while they wait) "
                             "and work in place on C-contiguous CPU arrays (NumPy, torch): no copies.")
        .def_prop_ro("rank", &Communicator::rank)
        .def_prop_ro("size", &Communicator::size)
        .def_prop_ro("backend", [](const Communicator& c) { return std::string(c.backend()); })
        .def_prop_ro("num_nodes", [](const Communicator& c) { return c.topology().num_nodes(); })
        .def(
            "send", [](Communicator& c, Array a, int peer, uint32_t tag) { wait(c.isend(a.data(), bytes_of(a), peer, tag)); },
            "array"_a, "peer"_a, "tag"_a = 0)
        .def(
            "recv", [](Communicator& c, Array a, int peer, uint32_t tag) { wait(c.irecv(a.data(), bytes_of(a), peer, tag)); },
            "array"_a, "peer"_a, "tag"_a = 0, "Receives into `array` (its size is the message size).")
        .def(
            "all_reduce", [](Communicator& c, Array a) { wait(c.all_reduce(a.data(), a.size(), dtype_of_array(a))); },
            "array"_a, "In-place sum over the group, added in rank order (deterministic).")
        .def(
            "all_gather",
            [](Communicator& c, Array send, Array recv) {
                DUPLEX_CHECK_ARG(bytes_of(recv) == bytes_of(send) * size_t(c.size()), "all_gather",
                                 "recv holds {} bytes, needs {} x {}", bytes_of(recv), c.size(), bytes_of(send));
                wait(c.all_gather(send.data(), recv.data(), bytes_of(send)));
            },
            "send"_a, "recv"_a)
        .def(
            "all_to_all",
            [](Communicator& c, Array send, Array recv) {
                DUPLEX_CHECK_ARG(bytes_of(send) == bytes_of(recv) && bytes_of(send) % size_t(c.size()) == 0,
                                 "all_to_all", "send and recv must hold the same bytes, a multiple of {} blocks",
                                 c.size());
                wait(c.all_to_all(send.data(), recv.data(), bytes_of(send) / size_t(c.size())));
            },
            "send"_a, "recv"_a, "Block p of send goes to rank p; block p of recv comes from rank p.")
        .def(
            "reduce_scatter",
            [](Communicator& c, Array send, Array recv) {
                DUPLEX_CHECK_ARG(send.size() == recv.size() * size_t(c.size()), "reduce_scatter",
                                 "send holds {} elements, needs {} x {}", send.size(), c.size(), recv.size());
                wait(c.reduce_scatter(send.data(), recv.data(), recv.size(), dtype_of_array(send)));
            },
            "send"_a, "recv"_a)
        .def("barrier", [](Communicator& c) { wait(c.barrier()); })
        .def(
            "split",
            [](Communicator& c, int color, int key) {
                nb::gil_scoped_release release;
                return c.split(color, key);
            },
            "color"_a, "key"_a, "Ranks with the same color form a new communicator, ordered by key.");

    m.def(
        "launch",
        [](nb::callable fn, int ranks, const std::string& backend, int virtual_nodes, double timeout_s) {
            LaunchOptions o;
            o.backend = backend;
            o.ranks = ranks;
            o.virtual_nodes = virtual_nodes;
            o.timeout_s = timeout_s;
            nb::gil_scoped_release release;
            launch(o, [&](const std::shared_ptr<Communicator>& world) {
                nb::gil_scoped_acquire acquire;
                try {
                    fn(world);
                } catch (nb::python_error& e) {
                    std::string what = e.what();
                    throw Error(fmt::format("rank {}: {}", world->rank(), what));
                }
            });
        },
        "fn"_a, "ranks"_a = 1, "backend"_a = "inproc", "virtual_nodes"_a = 0, "timeout_s"_a = -1.0,
        "Runs fn(world) on every rank: `ranks` threads of this process (backend inproc), or this process's rank "
        "when launched by torchrun / mpirun / Slurm (backend ucx or mpi). An exception on one rank stops the others "
        "and is raised here, naming the rank.");
    m.def("backends", &built_backends, "The communication backends built into this module.");
}
