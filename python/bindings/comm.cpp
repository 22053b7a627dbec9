// duplex._duplex, communication: the Communicator over C-contiguous CPU arrays (in place, no copies; waits
// release the GIL and go through a stage call's context when given one) and launch().
#include "python/bindings/common.hpp"

#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <mutex>

#include <fmt/format.h>

#include "comm/bench.hpp"
#include "comm/launch.hpp"
#include "core/error.hpp"
#include "parallel/expert_plan.hpp"

namespace duplex::py {

using namespace nb::literals;

namespace {

// Rows of send to each rank p (send_rows[p] of them), rows from each rank into recv: the byte counts and offsets
// of the communicator's all-to-all-v from row counts.
void all_to_all_v_rows(Communicator& c, Array send, std::vector<int64_t> send_rows, Array recv,
                       std::vector<int64_t> recv_rows, const std::string& what, const StageCall* call) {
    int n = c.size();
    DUPLEX_CHECK_ARG(int(send_rows.size()) == n && int(recv_rows.size()) == n, "all_to_all_v",
                     "{} send and {} receive counts for a group of {}", send_rows.size(), recv_rows.size(), n);
    int64_t ts = 0, tr = 0;
    for (int p = 0; p < n; ++p) ts += send_rows[p], tr += recv_rows[p];
    size_t row = ts > 0 ? bytes_of(send) / size_t(ts) : (tr > 0 ? bytes_of(recv) / size_t(tr) : 0);
    DUPLEX_CHECK_ARG(bytes_of(send) == size_t(ts) * row && bytes_of(recv) == size_t(tr) * row, "all_to_all_v",
                     "buffers of {} and {} bytes for {} and {} rows", bytes_of(send), bytes_of(recv), ts, tr);
    std::vector<size_t> sb(n), so(n), rb(n), ro(n);
    size_t a = 0, b = 0;
    for (int p = 0; p < n; ++p) {
        sb[p] = size_t(send_rows[p]) * row, so[p] = a, a += sb[p];
        rb[p] = size_t(recv_rows[p]) * row, ro[p] = b, b += rb[p];
    }
    wait(c.all_to_all_v(send.data(), sb, so, recv.data(), rb, ro), what, call);
}

// Who is in the group and where: ranks, nodes, and the expert-parallel plan's path and relays over it.
void bind_topology(nb::class_<Communicator>& cls) {
    cls.def_prop_ro("rank", &Communicator::rank)
        .def_prop_ro("size", &Communicator::size)
        .def_prop_ro("backend", [](const Communicator& c) { return std::string(c.backend()); })
        .def_prop_ro("num_nodes", [](const Communicator& c) { return c.topology().num_nodes(); })
        .def_prop_ro(
            "nodes",
            [](const Communicator& c) {
                std::vector<int> n(c.size());
                for (int r = 0; r < c.size(); ++r) n[r] = c.topology().node(r);
                return n;
            },
            "The node of each rank of the group (0.., in order of first appearance).")
        .def(
            "expert_path",
            [](const Communicator& c, bool node_limited) {
                return std::string(path_name(choose_path(node_limited, c.topology())));
            },
            "node_limited"_a = true,
            "The expert exchange's path over this group: 'node-limited' when asked for and the group spans several "
            "nodes, else 'flat' (the rule every Duplex exchange follows).")
        .def_prop_ro(
            "relays",
            [](const Communicator& c) {
                std::vector<int> r(c.size());
                for (int d = 0; d < c.size(); ++d) r[d] = relay_rank(d, c.rank(), c.topology());
                return r;
            },
            "Per destination rank, the relay of the node-limited path: the rank on its node with this rank's local "
            "index. ValueError when a node has too few ranks for one.");
}

// Point-to-point and collective operations, each waited for through the stage call when one is given.
void bind_operations(nb::class_<Communicator>& cls) {
    cls.def(
           "send",
           [](Communicator& c, Array a, int peer, uint32_t tag, const StageCall* call) {
               wait(c.isend(a.data(), bytes_of(a), peer, tag), "send", call);
           },
           "array"_a, "peer"_a, "tag"_a = 0, "call"_a.none() = nb::none())
        .def(
            "recv",
            [](Communicator& c, Array a, int peer, uint32_t tag, const StageCall* call) {
                wait(c.irecv(a.data(), bytes_of(a), peer, tag), "recv", call);
            },
            "array"_a, "peer"_a, "tag"_a = 0, "call"_a.none() = nb::none(),
            "Receives into `array` (its size is the message size).")
        .def(
            "all_reduce",
            [](Communicator& c, Array a, const StageCall* call) {
                wait(c.all_reduce(a.data(), a.size(), dtype_of_array(a)), "all_reduce", call);
            },
            "array"_a, "call"_a.none() = nb::none(),
            "In-place sum over the group, added in rank order (deterministic).")
        .def(
            "all_gather",
            [](Communicator& c, Array send, Array recv, const StageCall* call) {
                DUPLEX_CHECK_ARG(bytes_of(recv) == bytes_of(send) * size_t(c.size()), "all_gather",
                                 "recv holds {} bytes, needs {} x {}", bytes_of(recv), c.size(), bytes_of(send));
                wait(c.all_gather(send.data(), recv.data(), bytes_of(send)), "all_gather", call);
            },
            "send"_a, "recv"_a, "call"_a.none() = nb::none())
        .def(
            "all_to_all",
            [](Communicator& c, Array send, Array recv, const StageCall* call) {
                DUPLEX_CHECK_ARG(bytes_of(send) == bytes_of(recv) && bytes_of(send) % size_t(c.size()) == 0,
                                 "all_to_all", "send and recv must hold the same bytes, a multiple of {} blocks",
                                 c.size());
                wait(c.all_to_all(send.data(), recv.data(), bytes_of(send) / size_t(c.size())), "all_to_all", call);
            },
            "send"_a, "recv"_a, "call"_a.none() = nb::none(),
            "Block p of send goes to rank p; block p of recv comes from rank p.")
        .def(
            "reduce_scatter",
            [](Communicator& c, Array send, Array recv, const StageCall* call) {
                DUPLEX_CHECK_ARG(send.size() == recv.size() * size_t(c.size()), "reduce_scatter",
                                 "send holds {} elements, needs {} x {}", send.size(), c.size(), recv.size());
                wait(c.reduce_scatter(send.data(), recv.data(), recv.size(), dtype_of_array(send)), "reduce_scatter",
                     call);
            },
            "send"_a, "recv"_a, "call"_a.none() = nb::none())
        .def("all_to_all_v", &all_to_all_v_rows, "send"_a, "send_rows"_a, "recv"_a, "recv_rows"_a,
             "what"_a = "all_to_all_v", "call"_a.none() = nb::none(),
             "Rows of send go to each rank p (send_rows[p] of them, in rank order); rows from each rank land in recv "
             "(recv_rows[p], in rank order). Rows are equal-sized.")
        .def(
            "barrier", [](Communicator& c, const StageCall* call) { wait(c.barrier(), "barrier", call); },
            "call"_a.none() = nb::none())
        .def(
            "split",
            [](Communicator& c, int color, int key) {
                nb::gil_scoped_release release;
                return c.split(color, key);
            },
            "color"_a, "key"_a, "Ranks with the same color form a new communicator, ordered by key.");
}

void bind_communicator(nb::module_& m) {
    nb::class_<Communicator> cls(m, "Communicator",
                                 "A group of ranks. Operations block until done (the GIL is released while they wait) "
                                 "and work in place on C-contiguous CPU arrays (NumPy, torch): no copies.");
    bind_topology(cls);
    bind_operations(cls);
}

}  // namespace

// duplex.commbench (python/duplex/__init__.py): `duplex commbench`'s rows for each size, as dicts with its --json
// fields, from rank 0 of the launched ranks.
void bind_commbench(nb::module_& m) {
    m.def(
        "_commbench",
        [](const std::string& op, int ranks, const std::vector<size_t>& sizes, const std::string& backend, int iters,
           int warmup, bool check, int virtual_nodes, double skew) {
            DUPLEX_CHECK_ARG(!sizes.empty(), "sizes", "give at least one size in bytes");
            LaunchOptions l;
            l.backend = backend, l.ranks = ranks, l.virtual_nodes = virtual_nodes;
            std::vector<CommBenchRow> rows;
            std::mutex mu;
            {
                nb::gil_scoped_release release;
                launch(l, [&](const std::shared_ptr<Communicator>& comm) {
                    std::vector<CommBenchRow> mine;
                    for (size_t bytes : sizes) {
                        CommBenchOptions o;
                        o.op = op, o.min_bytes = o.max_bytes = bytes, o.iters = iters, o.warmup = warmup;
                        o.check = check, o.skew = skew;
                        validate(o);
                        for (CommBenchRow& r : run_commbench(*comm, o).rows) mine.push_back(r);
                    }
                    std::lock_guard<std::mutex> lock(mu);
                    if (comm->rank() == 0) rows = std::move(mine);
                });
            }
            nb::list out;
            for (const CommBenchRow& r : rows) {
                nb::dict d;
                d["size"] = r.bytes, d["count"] = r.count, d["type"] = r.type, d["time_us"] = r.time_us;
                d["algbw_gbs"] = r.algbw_gbs, d["busbw_gbs"] = r.busbw_gbs, d["wrong"] = r.wrong;
                out.append(d);
            }
            return out;
        },
        "op"_a, "ranks"_a, "sizes"_a, "backend"_a, "iters"_a, "warmup"_a, "check"_a, "virtual_nodes"_a, "skew"_a);
}

void bind_comm(nb::module_& m) {
    bind_communicator(m);
    bind_commbench(m);
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

}  // namespace duplex::py
