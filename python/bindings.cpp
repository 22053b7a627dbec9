// duplex._duplex: the Python face of the library (nanobind). Schedules as validated plans, the simulator, and
// the communicator over NumPy arrays and CPU tensors (any DLPack-capable array, zero-copy). Waits release the
// GIL, so in-process ranks (threads) run their Python code and their communication side by side.
#include <cmath>

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
#include "core/dlpack.hpp"
#include "core/error.hpp"
#include "parallel/plan.hpp"
#include "parallel/schedule.hpp"
#include "runtime/model/config.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/sim/simulator.hpp"
#include "runtime/exec/stage.hpp"
#include "runtime/train/trainer.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace duplex {
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

using Array = nb::ndarray<nb::c_contig, nb::device::cpu>;

DType dtype_of_dl(nb::dlpack::dtype t) { return dtype_from_dlpack(t.code, t.bits, t.lanes); }
DType dtype_of_array(const Array& a) { return dtype_of_dl(a.dtype()); }
size_t bytes_of(const Array& a) { return a.nbytes(); }

// A stage call as Python sees it (duplex.torch passes it to the group operations its stage runs): the stage's
// expert-parallel group, and the call's context while the call lasts (null after it returned).
struct StageCall {
    StageContext* ctx = nullptr;
    std::shared_ptr<Communicator> ep_group, ep_group_backward;
};

// A blocking wait with the GIL released. Given the stage call it runs in, the wait goes through the executor
// (traced as communication; with one compute stream the other half of an F&B pair runs meanwhile); elsewhere it
// is a plain wait. The GIL is released either way.
void wait(const WorkPtr& w, const std::string& what = "communication", const StageCall* call = nullptr) {
    nb::gil_scoped_release release;
    if (call && call->ctx)
        call->ctx->wait(w, what);
    else
        w->wait();
}

nb::tuple chunk_tuple(const sched::Chunk& c) { return nb::make_tuple(c.mb, c.stage, c.dir); }

// ---- tensors across the language boundary (DLPack, no copies but one: see PyStage::forward) ----

nb::dlpack::dtype dl_of(DType t) {
    nb::dlpack::dtype d{0, 0, 1};
    dlpack_type_of(t, d.code, d.bits);
    return d;
}

// A framework tensor as a Tensor over the same memory; the Python object stays alive with it (released under
// the GIL, whichever thread drops the last reference). Call with the GIL held.
Tensor tensor_from_py(nb::handle obj) {
    auto a = nb::cast<nb::ndarray<nb::c_contig>>(obj);
    Shape shape;
    for (size_t i = 0; i < a.ndim(); ++i) shape.push_back(int64_t(a.shape(i)));
    Device dev = a.device_type() == nb::device::cuda::value ? Device::cuda(a.device_id()) : Device::cpu();
    auto* keep = new nb::object(nb::borrow(obj));
    std::shared_ptr<void> owner(keep, [](void* p) {
        nb::gil_scoped_acquire gil;
        delete static_cast<nb::object*>(p);
    });
    return Tensor::wrap(a.data(), dtype_of_dl(a.dtype()), std::move(shape), dev, std::move(owner));
}

// A Tensor as a torch tensor sharing its storage. Call with the GIL held.
nb::object tensor_to_torch(const Tensor& t) {
    auto* keep = new Tensor(t);
    nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
    std::vector<size_t> shape(t.shape().begin(), t.shape().end());
    nb::ndarray<nb::pytorch> a(t.raw(), shape.size(), shape.data(), owner, nullptr, dl_of(t.dtype()),
                               t.device().kind == Device::CUDA ? nb::device::cuda::value : nb::device::cpu::value,
                               t.device().index);
    return nb::cast(a);
}

// ---- a stage written in Python ----

// The Python side (duplex/torch.py) implements: name(), activation(mb) -> (shape, dtype name),
// forward(mb, global, step, x or None) -> tensor or None, loss(mb) -> float,
// backward_input(mb, dy or None, weight_follows) -> tensor or None, backward_weight(mb),
// state() -> [(name, value, grad, expert, decay)], zero_grad().
class PyStage : public Stage {
public:
    explicit PyStage(nb::object py) : py_(std::move(py)) { name_ = nb::cast<std::string>(py_.attr("name")()); }
    ~PyStage() override {
        nb::gil_scoped_acquire gil;
        py_.reset();
    }
    std::string name() const override { return name_; }
    TensorSpec input_spec(const Microbatch& mb) const override {
        return call(mb, "activation", [&](nb::handle) {
            auto [shape, dtype] = nb::cast<std::pair<std::vector<int64_t>, std::string>>(py_.attr("activation")(mb.id));
            return TensorSpec{dtype_from_name(dtype), Shape(shape.begin(), shape.end()), Device::cpu()};
        });
    }
    TensorSpec output_spec(const Microbatch& mb) const override { return input_spec(mb); }
    Tensor forward(const Microbatch& mb, const TensorView& input) override {
        return call(mb, "forward", [&](nb::handle c) {
            // NOTE: one copy: the executor frees its receive buffer after the call, autograd may keep the input.
            nb::object x = input.empty() ? nb::none() : tensor_to_torch(Tensor::copy_of(input));
            nb::object out = py_.attr("forward")(mb.id, mb.global, mb.step, x, c);
            return out.is_none() ? Tensor() : tensor_from_py(out);
        });
    }
    double loss(const Microbatch& mb) override {
        return call(mb, "loss", [&](nb::handle) { return nb::cast<double>(py_.attr("loss")(mb.id)); });
    }
    Tensor backward_input(const Microbatch& mb, const TensorView& grad) override {
        return call(mb, "backward", [&](nb::handle c) {
            nb::object dy = grad.empty() ? nb::none() : tensor_to_torch(Tensor::copy_of(grad));
            nb::object dx = py_.attr("backward_input")(mb.id, dy, mb.weight_follows, c);
            return dx.is_none() ? Tensor() : tensor_from_py(dx);
        });
    }
    void backward_weight(const Microbatch& mb) override {
        call(mb, "backward_weight", [&](nb::handle c) {
            py_.attr("backward_weight")(mb.id, c);
            return 0;
        });
    }
    std::vector<StateBuffer> state() override {
        nb::gil_scoped_acquire gil;
        std::vector<StateBuffer> out;
        for (nb::handle item : py_.attr("state")()) {
            auto t = nb::cast<nb::tuple>(item);
            StateBuffer b;
            b.name = nb::cast<std::string>(t[0]);
            // (name, value, grad or None, expert, decay): None marks a buffer (checkpointed, not trained).
            b.kind = t[2].is_none() ? StateKind::Buffer : StateKind::Parameter;
            b.value = tensor_from_py(t[1]).view();  // views: the module owns its parameters and their .grad
            if (!t[2].is_none()) b.grad = tensor_from_py(t[2]).view();
            b.expert = nb::cast<bool>(t[3]);
            b.decay = nb::cast<bool>(t[4]);
            out.push_back(std::move(b));
        }
        return out;
    }
    void zero_grad() override {
        nb::gil_scoped_acquire gil;
        py_.attr("zero_grad")();
    }

private:
    // f(call) under the GIL, with the StageCall Python's group operations wait through (valid for this call only).
    template <typename F>
    auto call(const Microbatch& mb, const char* what, F&& f) const -> decltype(f(nb::handle())) {
        nb::gil_scoped_acquire gil;
        auto handle = std::make_shared<StageCall>();
        if (mb.ctx) {
            handle->ctx = mb.ctx;
            if (ExpertService* ep = mb.ctx->experts()) {
                handle->ep_group = ep->group(ExpertService::Forward);
                handle->ep_group_backward = ep->group(ExpertService::Backward);
            }
        }
        struct Expire {
            StageCall& c;
            ~Expire() { c.ctx = nullptr; }
        } expire{*handle};
        nb::object py_call = nb::cast(handle);
        try {
            return f(py_call);
        } catch (nb::python_error& e) {
            throw StageError(fmt::format("{}, microbatch {}: {} raised {}", name_, mb.id, what, e.what()));
        } catch (nb::cast_error& e) {
            throw StageError(fmt::format("{}, microbatch {}: {} returned the wrong type ({})", name_, mb.id, what,
                                         e.what()));
        }
    }
    nb::object py_;
    std::string name_;
};

// PipelineTrainer over Python stages, in the dtype of their parameters.
// The single-rank trainer of the built-in model in fp64, for an independent reference to check it against
// (tests/python/test_model_reference.py): its parameters, gradients, router bias, batches and expert counts.
struct ModelReference {
    TrainOptions o;
    std::unique_ptr<ReferenceTrainer<double>> t;
    int step = 0;
};

nb::ndarray<nb::numpy, double> to_numpy(const std::vector<double>& v, std::vector<size_t> shape) {
    auto* keep = new std::vector<double>(v);
    nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<std::vector<double>*>(p); });
    return nb::ndarray<nb::numpy, double>(keep->data(), shape.size(), shape.data(), owner);
}

nb::dict named_arrays(ReferenceTrainer<double>& t, bool grads) {
    nb::dict out;
    for (Param<double>* p : t.model().parameters()) {
        std::vector<size_t> shape(p->shape.begin(), p->shape.end());
        out[p->name.c_str()] = to_numpy(grads ? p->grad : p->value, shape);
    }
    return out;
}

struct PyTrainer {
    std::unique_ptr<PipelineTrainer<float>> f32;
    std::unique_ptr<PipelineTrainer<double>> f64;
    StepMetrics step() {
        nb::gil_scoped_release release;
        return f32 ? f32->step() : f64->step();
    }
    std::string save(const std::string& root, int keep) {
        nb::gil_scoped_release release;
        return f32 ? f32->save_checkpoint(root, keep) : f64->save_checkpoint(root, keep);
    }
    long load(const std::string& path) {
        nb::gil_scoped_release release;
        return f32 ? f32->load_checkpoint(path) : f64->load_checkpoint(path);
    }
    // The EMA of this rank's owned parameters, by name (float64 NumPy arrays; empty without ema_decay).
    nb::dict ema() {
        std::map<std::string, std::vector<double>> values;
        {
            nb::gil_scoped_release release;
            if (f32)
                for (auto& [name, v] : f32->ema_parameters()) values[name].assign(v.begin(), v.end());
            else
                for (auto& [name, v] : f64->ema_parameters()) values[name] = std::move(v);
        }
        nb::dict out;
        for (auto& [name, v] : values) {
            auto* keep = new std::vector<double>(std::move(v));
            nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<std::vector<double>*>(p); });
            size_t n = keep->size();
            out[name.c_str()] = nb::ndarray<nb::numpy, double>(keep->data(), 1, &n, owner);
        }
        return out;
    }
};

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
        .def_prop_ro("makespan", [](const Plan& p) { return p.time(p.replay.makespan); },
                     "end of the last instruction, in the costs' unit (an int when every cost is a whole number)")
        .def_prop_ro("idle", [](const Plan& p) { return p.times(p.replay.idle); }, "idle time per rank")
        .def_prop_ro("busy", [](const Plan& p) { return p.times(p.replay.busy); }, "busy time per rank")
        .def_prop_ro("peak_activations", [](const Plan& p) { return p.replay.peak_activations; },
                     "per rank: microbatch-chunks alive at once")
        .def_prop_ro("param_copies", [](const Plan& p) { return p.replay.param_copies; })
        .def_prop_ro("formula_bubble",
                     [](const Plan& p) { return p.time(sched::formula_bubble(p.schedule.kind, p.schedule.pp, p.costs)); },
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
        [](const std::string& schedule, int pp, int rank) {
            return sched::stages_of_rank(sched::kind_from_name(schedule), pp, rank);
        },
        "schedule"_a, "pp"_a, "rank"_a,
        "The model stages pipeline rank `rank` holds under `schedule` (1f1b, zb1p, dualpipe, dualpipev) with `pp` "
        "stages, its own first: [r] for 1f1b and zb1p, [r, pp-1-r] for dualpipe and dualpipev.");

    m.def(
        "schedule",
        [](const std::string& kind, int pp, int microbatches, double cost_f, double cost_b, double cost_w,
           double cost_fb, double p2p) {
            Plan p;
            p.kind = kind;
            p.costs = {cost_f, cost_b, cost_w, cost_fb, p2p};
            sched::check_costs(p.costs);
            p.whole_costs = true;
            for (double c : {cost_f, cost_b, cost_w, cost_fb, p2p}) p.whole_costs = p.whole_costs && std::nearbyint(c) == c;
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
        .def_prop_ro(
            "nodes",
            [](const Communicator& c) {
                std::vector<int> n(c.size());
                for (int r = 0; r < c.size(); ++r) n[r] = c.topology().node(r);
                return n;
            },
            "The node of each rank of the group (0.., in order of first appearance).")
        .def(
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
            "array"_a, "call"_a.none() = nb::none(), "In-place sum over the group, added in rank order (deterministic).")
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
            "send"_a, "recv"_a, "call"_a.none() = nb::none(), "Block p of send goes to rank p; block p of recv comes from rank p.")
        .def(
            "reduce_scatter",
            [](Communicator& c, Array send, Array recv, const StageCall* call) {
                DUPLEX_CHECK_ARG(send.size() == recv.size() * size_t(c.size()), "reduce_scatter",
                                 "send holds {} elements, needs {} x {}", send.size(), c.size(), recv.size());
                wait(c.reduce_scatter(send.data(), recv.data(), recv.size(), dtype_of_array(send)), "reduce_scatter",
                     call);
            },
            "send"_a, "recv"_a, "call"_a.none() = nb::none())
        .def(
            "all_to_all_v",
            [](Communicator& c, Array send, std::vector<int64_t> send_rows, Array recv, std::vector<int64_t> recv_rows,
               const std::string& what, const StageCall* call) {
                int n = c.size();
                DUPLEX_CHECK_ARG(int(send_rows.size()) == n && int(recv_rows.size()) == n, "all_to_all_v",
                                 "{} send and {} receive counts for a group of {}", send_rows.size(), recv_rows.size(),
                                 n);
                int64_t ts = 0, tr = 0;
                for (int p = 0; p < n; ++p) ts += send_rows[p], tr += recv_rows[p];
                size_t row = ts > 0 ? bytes_of(send) / size_t(ts) : (tr > 0 ? bytes_of(recv) / size_t(tr) : 0);
                DUPLEX_CHECK_ARG(bytes_of(send) == size_t(ts) * row && bytes_of(recv) == size_t(tr) * row,
                                 "all_to_all_v", "buffers of {} and {} bytes for {} and {} rows", bytes_of(send),
                                 bytes_of(recv), ts, tr);
                std::vector<size_t> sb(n), so(n), rb(n), ro(n);
                size_t a = 0, b = 0;
                for (int p = 0; p < n; ++p) {
                    sb[p] = size_t(send_rows[p]) * row, so[p] = a, a += sb[p];
                    rb[p] = size_t(recv_rows[p]) * row, ro[p] = b, b += rb[p];
                }
                wait(c.all_to_all_v(send.data(), sb, so, recv.data(), rb, ro), what, call);
            },
            "send"_a, "send_rows"_a, "recv"_a, "recv_rows"_a, "what"_a = "all_to_all_v", "call"_a.none() = nb::none(),
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

    nb::class_<StageInfo>(m, "StageInfo", "What a stage factory is told about the stage it builds.")
        .def_ro("stage", &StageInfo::stage)
        .def_ro("num_stages", &StageInfo::num_stages)
        .def_ro("first_layer", &StageInfo::first_layer)
        .def_ro("num_layers", &StageInfo::num_layers)
        .def_ro("loss_scale", &StageInfo::loss_scale)
        .def_ro("rank", &StageInfo::rank)
        .def_ro("ep_rank", &StageInfo::ep_rank, "the stage's rank in its expert-parallel group")
        .def_ro("ep_size", &StageInfo::ep_size, "the size of its expert-parallel group (1: no expert parallelism)");

    nb::class_<StageCall>(m, "StageCall",
                          "The stage call a Python stage method runs in: pass it as `call=` to a group operation and "
                          "its wait goes through Duplex's executor (in a DualPipe F&B pair the other half runs "
                          "meanwhile); after the call it waits plainly.")
        .def_prop_ro("ep_group", [](const StageCall& c) { return c.ep_group; },
                     "the stage's expert-parallel group for forward exchanges (None without EP)")
        .def_prop_ro("ep_group_backward", [](const StageCall& c) { return c.ep_group_backward; },
                     "the same ranks, a second communicator: backward exchanges never interleave with forward ones")
        .def_prop_ro("in_fb_pair", [](const StageCall& c) { return c.ctx && c.ctx->in_fb_pair(); });

    nb::class_<ModelReference>(m, "_ModelReference",
                               "The built-in model's single-rank trainer in fp64 (tests: an independent reference)")
        .def("__init__",
             [](ModelReference* r, const std::string& model, uint64_t seed, int microbatches, int sequences,
                double token_skew, double bias_update_speed, double balance_alpha, double lr, double weight_decay) {
                 new (r) ModelReference();
                 r->o.model = model, r->o.seed = seed, r->o.microbatches = microbatches;
                 r->o.sequences_per_microbatch = sequences, r->o.token_skew = token_skew;
                 r->o.bias_update_speed = bias_update_speed, r->o.balance_alpha = balance_alpha;
                 r->o.lr = lr, r->o.weight_decay = weight_decay, r->o.clip = 0;
                 r->t = std::make_unique<ReferenceTrainer<double>>(r->o);
             },
             "model"_a, "seed"_a, "microbatches"_a, "sequences"_a, "token_skew"_a, "bias_update_speed"_a,
             "balance_alpha"_a, "lr"_a, "weight_decay"_a)
        .def("config",
             [](ModelReference& r) {
                 ModelConfig c = r.o.model_config();
                 nb::dict d;
                 d["vocab"] = c.vocab, d["hidden"] = c.hidden, d["heads"] = c.heads, d["head_dim"] = c.head_dim;
                 d["layers"] = c.layers, d["dense_layers"] = c.dense_layers, d["experts"] = c.experts;
                 d["top_k"] = c.top_k, d["groups"] = c.groups, d["top_groups"] = c.top_groups;
                 d["shared_experts"] = c.shared_experts, d["route_scale"] = c.route_scale;
                 d["norm_eps"] = c.norm_eps, d["rope_base"] = c.rope_base, d["seq_len"] = c.seq_len;
                 d["balance_alpha"] = c.balance_alpha, d["bias_update_speed"] = c.bias_update_speed;
                 return d;
             })
        .def("parameters", [](ModelReference& r) { return named_arrays(*r.t, false); })
        .def("gradients", [](ModelReference& r) { return named_arrays(*r.t, true); },
             "the last step's gradients (no clipping)")
        .def("router_bias",
             [](ModelReference& r) {
                 nb::list l;
                 for (const auto& b : r.t->model().router_bias()) l.append(to_numpy(b, {b.size()}));
                 return l;
             })
        .def("expert_counts", [](ModelReference& r) { return r.t->last_expert_counts(); })
        .def("batch",
             [](ModelReference& r, int step, int mb) {
                 Batch b = r.t->batches().batch(step, mb);
                 nb::list tokens, targets;
                 for (int i = 0; i < b.sequences; ++i) {
                     tokens.append(std::vector<int>(b.tokens.begin() + i * b.seq_len, b.tokens.begin() + (i + 1) * b.seq_len));
                     targets.append(std::vector<int>(b.targets.begin() + i * b.seq_len, b.targets.begin() + (i + 1) * b.seq_len));
                 }
                 return nb::make_tuple(tokens, targets);
             })
        .def("step", [](ModelReference& r) {
            StepMetrics m = r.t->step();
            nb::dict d;
            d["step"] = m.step, d["loss"] = m.loss, d["aux_loss"] = m.aux_loss;
            return d;
        });

    nb::class_<PyTrainer>(m, "_Trainer")
        .def("__init__",
             [](PyTrainer* t, std::shared_ptr<Communicator> world, const std::string& schedule, int pp, int dp, int ep,
                int microbatches, nb::callable factory, const std::string& dtype, const std::string& optimizer,
                double lr, double weight_decay, double clip, double ema_decay) {
                 new (t) PyTrainer();
                 PipelineOptions p;
                 p.schedule = sched::kind_from_name(schedule);
                 p.pp = pp, p.dp = dp, p.ep = ep, p.optimizer = optimizer, p.ema_decay = ema_decay;
                 TrainOptions o;
                 o.microbatches = microbatches, o.lr = lr, o.weight_decay = weight_decay, o.clip = clip;
                 nb::object keep = nb::borrow(factory);
                 auto holder = std::shared_ptr<nb::object>(new nb::object(keep), [](nb::object* p) {
                     nb::gil_scoped_acquire gil;
                     delete p;
                 });
                 StageFactory f = [holder](const StageInfo& info) -> std::unique_ptr<Stage> {
                     nb::gil_scoped_acquire gil;
                     try {
                         return std::make_unique<PyStage>((*holder)(info));
                     } catch (nb::python_error& e) {
                         throw StageError(fmt::format("stage {}: the stage factory raised {}", info.stage, e.what()));
                     }
                 };
                 nb::gil_scoped_release release;
                 if (dtype == "float64")
                     t->f64 = std::make_unique<PipelineTrainer<double>>(world, p, o, f);
                 else if (dtype == "float32")
                     t->f32 = std::make_unique<PipelineTrainer<float>>(world, p, o, f);
                 else
                     throw ConfigError("dtype", fmt::format("'{}': the trainer runs float32 or float64", dtype));
             },
             "world"_a, "schedule"_a, "pp"_a, "dp"_a, "ep"_a, "microbatches"_a, "factory"_a, "dtype"_a, "optimizer"_a, "lr"_a,
             "weight_decay"_a, "clip"_a, "ema_decay"_a)
        .def("ema", &PyTrainer::ema)
        .def("save_checkpoint", &PyTrainer::save, "root"_a, "keep"_a = 0)
        .def("load_checkpoint", &PyTrainer::load, "path"_a)
        .def("steps_done", [](PyTrainer& t) { return t.f32 ? t.f32->steps_done() : t.f64->steps_done(); })
        .def("step",
             [](PyTrainer& t) {
                 StepMetrics m = t.step();
                 nb::dict d;
                 d["step"] = m.step, d["loss"] = m.loss, d["grad_norm"] = m.grad_norm;
                 d["bubble_fraction"] = m.bubble_fraction, d["step_time_s"] = m.step_time_s;
                 d["comm_hidden_fraction"] = m.comm_hidden_fraction;
                 d["fb_ep_comm_hidden_fraction"] = m.fb_ep_comm_hidden_fraction;
                 return d;
             })
        .def("close", [](PyTrainer& t) {
            nb::gil_scoped_release release;
            t.f32.reset();
            t.f64.reset();
        });
}
