// duplex._duplex, training: a stage written in Python behind the Stage contract (PyStage), the trainer that runs
// such stages (duplex.torch's Pipeline), and the built-in model's single-rank trainer as an fp64 reference for tests.
#include "python/bindings/common.hpp"

#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <fmt/format.h>

#include "core/error.hpp"
#include "runtime/train/fit.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/train/trainer.hpp"

namespace duplex::py {

using namespace nb::literals;

namespace {
nb::dlpack::dtype dl_of(DType t) {
    nb::dlpack::dtype d{0, 0, 1};
    dlpack_type_of(t, d.code, d.bits);
    return d;
}
}  // namespace

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

namespace {

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
        handle->forward_only = mb.forward_only;
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

// A PipelineTrainer over Python stages in the dtype of their parameters, chosen once when it is made.
class PyTrainer {
public:
    virtual ~PyTrainer() = default;
    virtual StepMetrics step() = 0;
    virtual StepMetrics evaluate() = 0;
    virtual std::string save(const std::string& root, int keep) = 0;
    virtual long load(const std::string& path) = 0;
    virtual long steps_done() const = 0;
    // The EMA of this rank's owned parameters, by name, as float64 (empty without ema_decay).
    virtual std::map<std::string, std::vector<double>> ema() = 0;
    virtual FitResult fit(const FitOptions& o, const FitCallbacks& cb) = 0;
};

template <typename T>
class PyTrainerOf : public PyTrainer {
public:
    template <typename... Args>
    explicit PyTrainerOf(Args&&... args) : t_(std::forward<Args>(args)...) {}
    StepMetrics step() override { return t_.step(); }
    StepMetrics evaluate() override { return t_.evaluate(t_.steps_done()); }
    std::string save(const std::string& root, int keep) override { return t_.save_checkpoint(root, keep); }
    long load(const std::string& path) override { return t_.load_checkpoint(path); }
    long steps_done() const override { return t_.steps_done(); }
    FitResult fit(const FitOptions& o, const FitCallbacks& cb) override { return duplex::fit(t_, o, cb); }
    std::map<std::string, std::vector<double>> ema() override {
        std::map<std::string, std::vector<double>> out;
        for (auto& [name, v] : t_.ema_parameters()) out[name].assign(v.begin(), v.end());
        return out;
    }

private:
    PipelineTrainer<T> t_;
};

std::unique_ptr<PyTrainer> make_trainer(const std::string& dtype, std::shared_ptr<Communicator> world,
                                        const PipelineOptions& p, const TrainOptions& o, StageFactory f) {
    if (dtype == "float64") return std::make_unique<PyTrainerOf<double>>(world, p, o, f);
    if (dtype == "float32") return std::make_unique<PyTrainerOf<float>>(world, p, o, f);
    throw ConfigError("dtype", fmt::format("'{}': the trainer runs float32 or float64", dtype));
}

// Holds the trainer; close() drops it (and with it the Python stages) before the interpreter winds down.
struct TrainerHandle {
    std::unique_ptr<PyTrainer> t;
    PyTrainer& get() {
        if (!t) throw Error("the Pipeline was closed");
        return *t;
    }
};

nb::dict metrics_dict(const StepMetrics& m) {
    nb::dict d;
    d["step"] = m.step, d["loss"] = m.loss, d["grad_norm"] = m.grad_norm, d["losses"] = m.losses;
    d["bubble_fraction"] = m.bubble_fraction, d["step_time_s"] = m.step_time_s;
    d["comm_hidden_fraction"] = m.comm_hidden_fraction;
    d["fb_ep_comm_hidden_fraction"] = m.fb_ep_comm_hidden_fraction;
    d["applied"] = m.applied, d["bad_steps_in_a_row"] = m.bad_steps_in_a_row, d["not_applied"] = m.not_applied;
    return d;
}

// A training step, or a forward-only pass, without the GIL; its metrics as a dict.
nb::dict run_step(TrainerHandle& t, bool forward_only) {
    StepMetrics m;
    {
        nb::gil_scoped_release release;
        m = forward_only ? t.get().evaluate() : t.get().step();
    }
    return metrics_dict(m);
}

nb::dict arrays_of(std::map<std::string, std::vector<double>> values) {
    nb::dict out;
    for (auto& [name, v] : values) {
        auto* keep = new std::vector<double>(std::move(v));
        nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<std::vector<double>*>(p); });
        size_t n = keep->size();
        out[name.c_str()] = nb::ndarray<nb::numpy, double>(keep->data(), 1, &n, owner);
    }
    return out;
}

}  // namespace

namespace {

void bind_stage_types(nb::module_& m) {
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
        .def_prop_ro("in_fb_pair", [](const StageCall& c) { return c.ctx && c.ctx->in_fb_pair(); })
        .def_prop_ro("forward_only", [](const StageCall& c) { return c.forward_only; },
                     "an evaluation forward: no backward follows (keep nothing for one)");

}

void bind_model_reference(nb::module_& m) {
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

}

// Pipeline.fit: the library's training loop with Python callables around each step (called with the GIL; the
// loop runs without it).
nb::dict fit_trainer(TrainerHandle& t, long steps, const std::string& save, int save_every, int keep,
                     const std::string& resume, nb::object before_step, nb::object on_step, int max_bad_steps) {
    FitOptions o;
    o.steps = steps, o.save = save, o.save_every = save_every, o.keep = keep, o.resume = resume;
    o.max_bad_steps = max_bad_steps;
    FitCallbacks cb;
    // Python callables, called with the GIL (fit runs without it).
    if (!before_step.is_none())
        cb.before_step = [&](long step) {
            nb::gil_scoped_acquire gil;
            try {
                before_step(step);
            } catch (nb::python_error& e) {
                throw Error(fmt::format("before step {}: {}", step, e.what()));
            }
        };
    if (!on_step.is_none())
        cb.on_step = [&](const StepMetrics& m) {
            nb::gil_scoped_acquire gil;
            try {
                on_step(metrics_dict(m));
            } catch (nb::python_error& e) {
                throw Error(fmt::format("after step {}: {}", m.step, e.what()));
            }
        };
    FitResult r;
    {
        nb::gil_scoped_release release;
        r = t.get().fit(o, cb);
    }
    nb::dict d;
    d["start"] = r.start, d["steps_done"] = r.steps_done;
    d["first_loss"] = r.first_loss, d["last_loss"] = r.last_loss;
    return d;
}

void bind_trainer(nb::module_& m) {
    nb::class_<TrainerHandle>(m, "_Trainer")
        .def("__init__",
             [](TrainerHandle* t, std::shared_ptr<Communicator> world, const std::string& schedule, int pp, int dp, int ep,
                int microbatches, nb::callable factory, const std::string& dtype, const std::string& optimizer,
                double lr, double weight_decay, double clip, double ema_decay, bool sum_pairs, double loss_scale,
                bool overlap_pairs, int vpp) {
                 new (t) TrainerHandle();
                 PipelineOptions p;
                 p.schedule = sched::kind_from_name(schedule);
                 p.pp = pp, p.dp = dp, p.ep = ep, p.vpp = vpp, p.optimizer = optimizer, p.ema_decay = ema_decay;
                 p.sum_pairs = sum_pairs, p.loss_scale = loss_scale, p.overlap_pairs = overlap_pairs;
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
                 t->t = make_trainer(dtype, world, p, o, f);
             },
             "world"_a, "schedule"_a, "pp"_a, "dp"_a, "ep"_a, "microbatches"_a, "factory"_a, "dtype"_a, "optimizer"_a, "lr"_a,
             "weight_decay"_a, "clip"_a, "ema_decay"_a, "sum_pairs"_a = true, "loss_scale"_a = 0.0,
             "overlap_pairs"_a = true, "vpp"_a = 1)
        .def("ema",
             [](TrainerHandle& t) {
                 std::map<std::string, std::vector<double>> values;
                 {
                     nb::gil_scoped_release release;
                     values = t.get().ema();
                 }
                 return arrays_of(std::move(values));
             })
        .def(
            "save_checkpoint",
            [](TrainerHandle& t, const std::string& root, int keep) {
                nb::gil_scoped_release release;
                return t.get().save(root, keep);
            },
            "root"_a, "keep"_a = 0)
        .def(
            "load_checkpoint",
            [](TrainerHandle& t, const std::string& path) {
                nb::gil_scoped_release release;
                return t.get().load(path);
            },
            "path"_a)
        .def("steps_done", [](TrainerHandle& t) { return t.get().steps_done(); })
        .def("fit", &fit_trainer, "steps"_a, "save"_a = "", "save_every"_a = 0, "keep"_a = 0, "resume"_a = "",
             "before_step"_a = nb::none(), "on_step"_a = nb::none(), "max_bad_steps"_a = 3)
        .def("step", [](TrainerHandle& t) { return run_step(t, false); })
        .def("evaluate", [](TrainerHandle& t) { return run_step(t, true); }, "forward and loss only")
        .def("close", [](TrainerHandle& t) {
            nb::gil_scoped_release release;
            t.t.reset();
        });
}

}  // namespace

void bind_training(nb::module_& m) {
    bind_stage_types(m);
    bind_model_reference(m);
    bind_trainer(m);
}

}  // namespace duplex::py
