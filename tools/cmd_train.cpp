// duplex train: training runs of the built-in model: the single-rank reference (--ranks 1, the default without a
// layout) or a distributed layout (--pp/--dp/--ep and a schedule) through the one executor, in math or emulate mode.
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "comm/launch.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/host_memory.hpp"
#include "parallel/schedule.hpp"
#include "parallel/plan.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/fit.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/train/reference.hpp"
#include "runtime/train/report.hpp"
#include "runtime/train/trainer.hpp"
#include "tools/commands.hpp"

namespace duplex::tools {

namespace {

struct Args {
    TrainOptions train;
    PipelineOptions pipe;
    std::string schedule = "1f1b";
    std::string backend = "inproc";
    bool check_reference = false;
    std::string trace;
    std::string mode = "math";
    std::string device = "h800";
    double time_scale = 1.0;
    bool serial_grad_sync = false;
    double cost_f_ms = 0, cost_b_ms = 0, cost_w_ms = 0, cost_fb_ms = -1;
    int virtual_nodes = 0;
    int ranks = 1;
    int log_every = 10;
    std::string json;
    std::string metrics;          // JSON Lines, one line per step, appended and flushed as it happens
    std::string save, resume;     // checkpoint roots
    int save_every = 0, keep = 3;
    int max_bad_steps = 3;
    bool fp64 = false;
    bool no_bias_update = false;
};

// --metrics: one JSON object per line, appended and flushed after every step, so a run killed mid-way keeps every
// completed step's line.
class MetricsLog {
public:
    explicit MetricsLog(const std::string& path) : path_(path) {
        if (path.empty()) return;
        f_ = std::fopen(path.c_str(), "a");
        if (!f_) throw ConfigError("--metrics", fmt::format("cannot append to '{}'", path));
    }
    ~MetricsLog() {
        if (f_) std::fclose(f_);
    }
    MetricsLog(const MetricsLog&) = delete;
    MetricsLog& operator=(const MetricsLog&) = delete;
    void write(const nlohmann::json& j) {
        if (!f_) return;
        std::string line = j.dump() + "\n";
        if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
            throw ConfigError("--metrics", fmt::format("cannot write to '{}'", path_));
    }

private:
    std::string path_;
    std::FILE* f_ = nullptr;
};

template <typename T>
int run_typed(const Args& a) {
    TrainOptions o = a.train;
    o.bias_update = !a.no_bias_update;
    o.validate();
    auto [need, what] = o.memory_lower_bound(1, sizeof(T), false);
    check_host_memory(need, "--mb-sequences", what);
    ReferenceTrainer<T> trainer(o);
    const ModelConfig& c = trainer.model().config();
    fmt::print(human(), "# duplex train: model {} ({} parameters, {} layers, {} routed experts top-{}), 1 rank, {}\n", c.name,
               c.num_parameters(), c.layers, c.experts, c.top_k, a.fp64 ? "fp64" : "fp32");
    fmt::print(human(), "# {} steps x {} microbatches x {} sequences x {} tokens; lr {}; recompute {}; bias update {}; experts "
               "on {}\n", o.steps, o.microbatches, o.sequences_per_microbatch, c.seq_len, o.lr, o.recompute ? "on" : "off",
               o.bias_update ? "on" : "off", o.device);
    nlohmann::json steps = nlohmann::json::array();
    double first_loss = 0;
    MetricsLog log(a.metrics);
    auto metrics = trainer.run([&](const StepMetrics& m) {
        if (m.step == 1) first_loss = m.loss;
        steps.push_back({{"step", m.step},
                         {"loss", m.loss},
                         {"aux_loss", m.aux_loss},
                         {"max_vio", m.max_vio},
                         {"grad_norm", m.grad_norm},
                         {"step_time_s", m.step_time_s},
                         {"tokens_per_s", m.tokens_per_s},
                         {"applied", m.applied}});
        log.write(steps.back());
        if (!m.applied) fmt::print(stderr, "duplex train: {}\n", m.not_applied);
        if (m.step == 1 || m.step % a.log_every == 0 || m.step == o.steps)
            fmt::print(human(), "step {:>5}  loss {:8.4f}  tokens/s {:9.0f}  MaxVio {:6.3f}  |g| {:7.3f}\n", m.step, m.loss,
                       m.tokens_per_s, m.max_vio, m.grad_norm);
        std::fflush(human());
    }, a.max_bad_steps);
    double last = metrics.back().loss;
    fmt::print(human(), "# loss {:.4f} -> {:.4f} ({:.1f}% of the initial); peak activation bytes {}\n", first_loss, last,
               100.0 * last / first_loss, trainer.model().ledger().peak("activations"));
    if (!a.json.empty()) {
        nlohmann::json j = {{"model", c.name},
                            {"ranks", 1},
                            {"dtype", a.fp64 ? "fp64" : "fp32"},
                            {"recompute", o.recompute},
                            {"peak_activation_bytes", trainer.model().ledger().peak("activations")},
                            {"steps", steps}};
        write_text_file(a.json, j.dump(1) + "\n", "--json");
        note_written("metrics", a.json);
    }
    return 0;
}

// One step's JSON Lines record (and --json entry).
nlohmann::json step_json(const StepMetrics& m) {
    return {{"step", m.step},
            {"loss", m.loss},
            {"max_vio", m.max_vio},
            {"grad_norm", m.grad_norm},
            {"bubble_fraction", m.bubble_fraction},
            {"step_time_s", m.step_time_s},
            {"tokens_per_s", m.tokens_per_s},
            {"comm_hidden_fraction", m.comm_hidden_fraction},
            {"fb_ep_comm_hidden_fraction", m.fb_ep_comm_hidden_fraction},
            {"applied", m.applied}};
}

void print_step(const StepMetrics& m, bool emulate, const std::string& reference) {
    if (!m.applied) fmt::print(stderr, "duplex train: {}\n", m.not_applied);
    fmt::print(human(), "step {:>5}  {}step {:8.2f} ms  tokens/s {:9.0f}  bubble {:5.1f}%  comm hidden {}{}{}\n", m.step,
               emulate ? std::string() : fmt::format("loss {:8.4f}  ", m.loss), m.step_time_s * 1e3, m.tokens_per_s,
               100 * m.bubble_fraction,
               std::isnan(m.comm_hidden_fraction) ? std::string("  -  ")
                                                  : fmt::format("{:5.1f}%", 100 * m.comm_hidden_fraction),
               emulate ? std::string() : fmt::format("  MaxVio {:6.3f}  |g| {:7.3f}", m.max_vio, m.grad_norm), reference);
    std::fflush(human());
}

template <typename T>
void print_run_header(const Args& a, const PipelineOptions& p, const TrainOptions& o, const Communicator& world) {
    const ModelConfig c = o.model_config();
    if (p.emulate) {
        EmulatePrediction e = predict_emulated_step(p, o, sizeof(T));
        const ChunkCosts& cc = e.chunk;
        fmt::print(human(), "# emulate: chunk F {:.3g} ms, B {:.3g} ms, W {:.3g} ms, F&B {:.3g} ms, transfer {:.3g} ms; "
                   "the schedule replay predicts {:.4g} ms per step\n",
                   cc.f * 1e3, cc.b * 1e3, cc.w * 1e3, cc.fb * 1e3, e.transfer_s * 1e3, e.step_s * 1e3);
        if (cc.f < 1e-3)
            fmt::print(human(), "# note: emulated chunks under 1 ms are dominated by timer and thread overheads on a CPU; "
                       "raise --time-scale (e.g. {:.0f}) or give --cost-f/--cost-b/--cost-w\n",
                       std::ceil(5e-3 / std::max(cc.f, 1e-12) * p.cost_model.device().time_scale));
    }
    fmt::print(human(), "# duplex train: model {} ({} parameters), {} ranks ({}): {} PP={}{} x DP={} x EP={}, {}{}\n",
               c.name, c.num_parameters(), world.size(), world.backend(), a.schedule, p.pp,
               p.vpp > 1 ? fmt::format(" ({} per rank)", p.vpp) : "", p.dp, p.ep, a.fp64 ? "fp64" : "fp32",
               o.device == "cpu" ? "" : ", routed experts on " + o.device);
    fmt::print(human(), "# {} steps x {} microbatches per replica x {} sequences x {} tokens{}\n", o.steps, o.microbatches,
               o.sequences_per_microbatch, c.seq_len, p.emulate ? " (emulated compute)" : "");
}

// After the loop, on rank 0: the expert traffic, the reference comparison, the EMA evaluation, into `out` and
// printed. Returns false when the run is farther from the reference than allowed.
template <typename T>
bool report_run(const Args& a, const PipelineOptions& p, const TrainOptions& o, const ExpertTrafficReport& ep,
                const std::string& dispatch_path, int nodes, const std::map<std::string, std::vector<T>>& params,
                const std::map<std::string, std::vector<T>>& ema, ReferenceCheck<T>* ref, nlohmann::json& out) {
    if (p.ep > 1 && o.exchange_on != "host") {
        out["exchange_on"] = o.exchange_on;
        fmt::print(human(), "# expert dispatch/combine rows moved by the exchange kernel on the GPU ({} SMs; the "
                   "communicator's byte counters do not see them)\n",
                   o.comm_sms);
    } else if (p.ep > 1) {
        out["expert_bytes"] = {{"intra_node", ep.bytes.intra_node}, {"inter_node", ep.bytes.inter_node},
                               {"inter_node_per_token_direction", ep.inter_node_per_token_direction},
                               {"node_limited_bound", ep.node_limited_bound}};
        out["dispatch"] = dispatch_path;
        fmt::print(human(), "# expert dispatch/combine bytes, all ranks: intra-node {}, inter-node {} ({} virtual nodes, {} "
                   "dispatch)\n", ep.bytes.intra_node, ep.bytes.inter_node, nodes, dispatch_path);
        fmt::print(human(), "# inter-node bytes per token, MoE layer and direction: {:.1f} (bound M x hidden x elem = {:.0f})\n",
                   ep.inter_node_per_token_direction, ep.node_limited_bound);
    }
    bool ok = true;
    if (ref) {
        auto r = ref->finish(params, o.device != "cpu");
        out["reference_max_loss_diff"] = r.worst_loss_diff;
        out["reference_max_param_rel_diff"] = r.params.worst;
        fmt::print(human(), "# against the single-rank reference: max loss rel diff {:.3g}, max parameter rel diff {:.3g}{}\n",
                   r.worst_loss_diff, r.params.worst, r.params.worst_name.empty() ? "" : " (" + r.params.worst_name + ")");
        if (!r.ok) {
            ok = false;
            fmt::print(stderr, "duplex train: MISMATCH with the reference (allowed: loss {:.0e}, parameters {:.0e})\n",
                       r.tolerance.loss, r.tolerance.param);
        }
    }
    if (p.ema_decay > 0) {
        EmaEvaluation e = evaluate_ema<T>(o.model_config(), o.seed, params, ema);
        out["eval_loss"] = e.live;
        out["ema_eval_loss"] = e.smoothed;
        fmt::print(human(), "# held-out batch: loss {:.4f} with the trained weights, {:.4f} with their EMA (decay {})\n",
                   e.live, e.smoothed, p.ema_decay);
    }
    return ok;
}

// One rank of a distributed run: the trainer, the loop with rank 0 printing and logging, then the run's report.
template <typename T>
void train_rank(const Args& a, const PipelineOptions& p, const TrainOptions& o, const FitOptions& fo,
                const std::shared_ptr<Communicator>& world, bool& mismatch) {
    PipelineTrainer<T> trainer(world, p, o);
    bool lead = world->rank() == 0;
    std::unique_ptr<ReferenceCheck<T>> ref;
    if (lead && a.check_reference) ref = std::make_unique<ReferenceCheck<T>>(o, p);
    std::unique_ptr<MetricsLog> log = lead ? std::make_unique<MetricsLog>(a.metrics) : nullptr;
    if (lead) print_run_header<T>(a, p, o, *world);
    nlohmann::json steps = nlohmann::json::array();
    long start = 0;
    FitCallbacks cb;
    cb.on_resume = [&](long step, double seconds) {
        start = step;
        if (!lead) return;
        fmt::print(human(), "# resumed from {} after step {} ({:.2f} s); training to step {}\n",
                   ckpt::latest_checkpoint(a.resume).value_or(a.resume), step, seconds, o.steps);
        if (step >= o.steps)
            fmt::print(human(), "# the checkpoint is at step {}, already at --steps {}: nothing to train\n", step, o.steps);
    };
    cb.on_save = [&](const std::string& dir, const char* why, double seconds) {
        if (lead)
            fmt::print(human(), "# checkpoint of step {} written to {} ({}, {:.2f} s)\n", trainer.steps_done(), dir, why,
                       seconds);
    };
    // The step is logged before it is checkpointed: a crash in the save keeps its metrics line.
    cb.on_step = [&](const StepMetrics& m) {
        if (!lead) return;
        nlohmann::json j = step_json(m);
        std::string reference;
        if (ref) {
            double r = ref->step(m.loss);
            j["reference_loss"] = r;
            j["reference_loss_rel_diff"] = std::fabs(r - m.loss) / std::max(std::fabs(r), 1e-30);
            reference = fmt::format("  reference loss {:8.4f}", r);
        }
        steps.push_back(j);
        log->write(j);
        if (m.step == 1 || m.step == start + 1 || m.step % a.log_every == 0 || m.step == o.steps || !m.applied)
            print_step(m, p.emulate, reference);
    };
    FitResult fr = fit(trainer, fo, cb);
    LinkBytes eb = trainer.expert_bytes_sent();
    int64_t ep_bytes[2] = {int64_t(eb.intra_node), int64_t(eb.inter_node)};
    world->all_reduce(ep_bytes, 2, DType::I64)->wait();
    auto params = gather_named_tensors<T>(*world, trainer.owned_parameters());
    auto ema = gather_named_tensors<T>(*world, trainer.ema_parameters());
    std::vector<std::string> traces = gather_strings(*world, trainer.trace_blob());
    if (!lead) return;
    nlohmann::json out = {{"model", o.model_config().name}, {"schedule", a.schedule}, {"pp", p.pp}, {"vpp", p.vpp}, {"dp", p.dp},
                          {"ep", p.ep}, {"ranks", world->size()}, {"backend", world->backend()},
                          {"dtype", a.fp64 ? "fp64" : "fp32"}, {"steps", steps}, {"mode", a.mode}};
    if (!p.emulate && fr.steps_done > fr.start)
        fmt::print(human(), "# loss {:.4f} -> {:.4f} ({:.1f}% of the initial)\n", fr.first_loss, fr.last_loss,
                   100.0 * fr.last_loss / fr.first_loss);
    ExpertTrafficReport ep = expert_traffic_report({uint64_t(ep_bytes[0]), uint64_t(ep_bytes[1])}, p, o,
                                                   fr.steps_done - fr.start, a.fp64 ? 8 : 4);
    if (!report_run<T>(a, p, o, ep, trainer.dispatch_path(), world->topology().num_nodes(), params, ema, ref.get(), out))
        mismatch = true;
    if (!a.trace.empty()) {
        write_chrome_trace(a.trace, traces);
        fmt::print(human(), "# trace of {} ranks written to {} (open in ui.perfetto.dev or chrome://tracing)\n",
                   traces.size(), a.trace);
    }
    if (!a.json.empty()) {
        write_text_file(a.json, out.dump(1) + "\n", "--json");
        note_written("metrics", a.json);
    }
}

template <typename T>
int run_distributed(const Args& a) {
    PipelineOptions p = a.pipe;
    p.schedule = sched::kind_from_name(a.schedule);
    p.trace = !a.trace.empty();
    if (a.mode != "math" && a.mode != "emulate")
        throw ConfigError("--mode", fmt::format("'{}' is not math or emulate", a.mode));
    p.emulate = a.mode == "emulate";
    if (p.emulate) {
        p.cost_model = CostModel::preset(a.device);
        p.cost_model.device().time_scale = a.time_scale;
        p.overlap_grad_sync = !a.serial_grad_sync;
        if (a.cost_f_ms > 0) {
            sched::Costs c{a.cost_f_ms, a.cost_b_ms, a.cost_w_ms, a.cost_fb_ms, 0};
            sched::check_costs(c);
            p.emulate_costs = {a.cost_f_ms * 1e-3, a.cost_b_ms * 1e-3, a.cost_w_ms * 1e-3, c.fb_cost() * 1e-3};
        }
        DUPLEX_CHECK_ARG(!a.check_reference, "--check-reference", "needs --mode math (emulate computes nothing)");
    }
    TrainOptions o = a.train;
    o.bias_update = !a.no_bias_update;
    RunPlan plan{p.schedule, p.pp, p.dp, p.ep, p.vpp};
    int world_size = plan.world_size();
    PipelineTrainer<T>::validate(p, o, world_size);  // the layout, the model and the options, before anything runs
    LaunchOptions l;
    l.backend = a.backend;
    l.ranks = world_size;
    l.virtual_nodes = a.virtual_nodes;
    if (a.backend != "mpi" && backend_is_multiprocess(a.backend)) {  // mpi's world is its own: checked once it exists
        ProcessEnv env = process_env();
        if (env.world_size != world_size)
            throw ConfigError("--pp/--dp", fmt::format("the layout needs {} ranks but {} were launched ({})", world_size,
                                                       env.world_size, env.source));
    }
    {
        // Before anything is allocated: this process's share of the job (all of it in-process).
        bool multi = backend_is_multiprocess(a.backend);
        int here = multi ? std::max(1, process_env().local_size) : world_size;
        auto [need, what] = o.memory_lower_bound(p.dp, sizeof(T), p.emulate);
        check_host_memory(need * here / world_size, "--mb-sequences",
                          here == world_size ? what : fmt::format("{} of {} ranks' share of {}", here, world_size, what));
    }
    DUPLEX_CHECK_ARG(a.save.empty() || !p.emulate, "--save", "emulate mode trains no weights: nothing to checkpoint");
    DUPLEX_CHECK_ARG(a.resume.empty() || !p.emulate, "--resume", "emulate mode trains no weights: nothing to resume");
    DUPLEX_CHECK_ARG(a.resume.empty() || !a.check_reference, "--check-reference",
                     "the single-rank reference starts from step 1; it cannot follow a resumed run");
    FitOptions fo;
    fo.steps = o.steps, fo.save = a.save, fo.save_every = a.save_every, fo.keep = a.keep, fo.resume = a.resume;
    fo.max_bad_steps = a.max_bad_steps;
    fo.validate();
    bool mismatch = false;  // --check-reference: set on rank 0 when the run is farther from the reference than allowed
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        if (world->size() != world_size)
            throw ConfigError("--pp/--dp", fmt::format("the layout needs {} ranks but {} were launched", world_size,
                                                       world->size()));
        train_rank<T>(a, p, o, fo, world, mismatch);
    });
    return mismatch ? 1 : 0;
}

// The layout, the backend and emulate mode.
void add_layout_options(CLI::App* cmd, Args* a) {
    cmd->add_option("--ranks", a->ranks,
                    "1: the single-rank reference (the default without --pp/--dp/--ep/--schedule); a distributed run "
                    "takes its rank count from the layout")
        ->capture_default_str();
    cmd->add_option("--pp", a->pipe.pp, "pipeline stages of the model (dualpipev: on pp/2 ranks; interleaved: on pp/vpp)")
        ->capture_default_str();
    cmd->add_option("--vpp", a->pipe.vpp,
                    "interleaved: model stages per rank (Megatron's virtual pipeline size; its PP 4 VP 2 is --pp 8 "
                    "--vpp 2)")
        ->capture_default_str();
    cmd->add_option("--dp", a->pipe.dp, "data-parallel replicas")->capture_default_str();
    cmd->add_option("--ep", a->pipe.ep, "expert parallelism inside DP (divides DP and the routed experts)")
        ->capture_default_str();
    cmd->add_option("--experts-on", a->train.device,
                    "where the routed experts compute: cpu, or cuda (rank r on GPU r % GPUs) / cuda:N — the CUDA "
                    "path of the MoE layers (fp32)")
        ->capture_default_str();
    cmd->add_option("--exchange-on", a->train.exchange_on,
                    "how EP dispatch/combine rows move: host (the communicator) or cuda (the exchange kernel on the "
                    "experts' GPU, its own stream and --comm-sms SMs; needs --experts-on). Threads of one process on "
                    "one GPU: one launch moves every rank's rows; processes (mpirun, torchrun) or GPUs of one node: "
                    "each rank writes its rows into its peers' buffers through CUDA IPC")
        ->capture_default_str();
    cmd->add_option("--comm-sms", a->train.comm_sms, "--exchange-on cuda: SMs the exchange kernel may occupy")
        ->capture_default_str();
    cmd->add_option("--dispatch", a->pipe.dispatch,
                    "EP groups over several nodes: hierarchical (node-limited, one crossing per node) or flat "
                    "(one copy per expert)")
        ->capture_default_str();
    cmd->add_option("--schedule", a->schedule, "1f1b, zb1p, dualpipe, dualpipev or interleaved (1F1B over --vpp stages "
                    "per rank)")
        ->capture_default_str();
    cmd->add_option("--backend", a->backend,
                    "inproc (threads), mpi / ucx (processes under mpirun, torchrun or srun), or nccl (payloads through "
                    "NCCL, a GPU per rank: threads, or processes under a launcher)")
        ->capture_default_str();
    cmd->add_option("--virtual-nodes", a->virtual_nodes, "split the ranks into this many virtual nodes");
    cmd->add_option("--mode", a->mode, "math (real compute) or emulate (timed waits from the cost model)")
        ->capture_default_str();
    cmd->add_option("--device", a->device, "emulate: device preset of the cost model")->capture_default_str();
    cmd->add_option("--time-scale", a->time_scale, "emulate: multiply every modelled duration")->capture_default_str();
    cmd->add_flag("--serial-grad-sync", a->serial_grad_sync,
                  "emulate: the step-end gradient synchronization after the pipeline (default: each stage's starts "
                  "when its last weight gradient is done, as `duplex simulate` models it)");
    cmd->add_option("--cost-f", a->cost_f_ms, "emulate: forward chunk in ms (default: from the cost model)");
    cmd->add_option("--cost-b", a->cost_b_ms, "emulate: full backward chunk in ms");
    cmd->add_option("--cost-w", a->cost_w_ms, "emulate: weight-gradient part of the backward in ms");
    cmd->add_option("--cost-fb", a->cost_fb_ms, "emulate: overlapped F&B pair in ms (default F+B)");
    cmd->add_option("--trace", a->trace, "write a Chrome-trace / Perfetto JSON of every rank's compute and comm");
    cmd->add_option("--ema-decay", a->pipe.ema_decay, "keep a CPU EMA of the weights with this decay (0: off)");
    cmd->add_flag("--check-reference", a->check_reference,
                  "rank 0 also trains the single-rank reference on the same batch and reports the differences");
}

// The model, the data and the optimizer.
void add_model_options(CLI::App* cmd, Args* a) {
    cmd->add_option("--model", a->train.model, "tiny or small")->capture_default_str();
    cmd->add_option("--steps", a->train.steps, "optimizer steps")->capture_default_str();
    cmd->add_option("--microbatches", a->train.microbatches, "microbatches per step")->capture_default_str();
    cmd->add_option("--mb-sequences", a->train.sequences_per_microbatch, "sequences per microbatch")
        ->capture_default_str();
    cmd->add_option("--seed", a->train.seed, "seed of the model and the data")->capture_default_str();
    cmd->add_option("--lr", a->train.lr, "AdamW learning rate")->capture_default_str();
    cmd->add_option("--clip", a->train.clip, "clip gradients to this global norm (0: off)")->capture_default_str();
    cmd->add_option("--token-skew", a->train.token_skew, "Zipf exponent of input tokens (skews expert load)")
        ->capture_default_str();
    cmd->add_flag("--recompute", a->train.recompute, "recompute RMSNorm and SwiGLU outputs in backward");
    cmd->add_option("--bias-update-speed", a->train.bias_update_speed,
                    "gamma of the aux-loss-free bias update (default: the preset's 0.001)");
    cmd->add_option("--layers", a->train.layers,
                    "override the model's number of layers (e.g. 16 for --schedule dualpipe --pp 16 on a small preset)");
    cmd->add_option("--data", a->train.data,
                    "training data: synthetic (the built-in task), or a file of token ids PATH[:u16|:u32] (default "
                    "u16; ids below the model's vocabulary), read as windows of seq_len + 1 tokens")
        ->capture_default_str();
    cmd->add_option("--dense-layers", a->train.dense_layers,
                    "override the model's number of leading dense (non-MoE) layers");
    cmd->add_option("--balance-alpha", a->train.balance_alpha, "weight of the sequence-wise balance loss (0: off)")
        ->capture_default_str();
    cmd->add_flag("--no-bias-update", a->no_bias_update, "freeze the aux-loss-free routing bias");
    cmd->add_flag("--fp64", a->fp64, "train in double precision");
}

// Checkpoints, metrics and progress.
void add_output_options(CLI::App* cmd, Args* a) {
    cmd->add_option("--save", a->save,
                    "write checkpoints under this directory (DIR/step-NNNNNNNN: a shard per rank and a manifest "
                    "written last, so an interrupted save never replaces a good one); at the end of the run and "
                    "every --save-every steps");
    cmd->add_option("--save-every", a->save_every, "with --save: also checkpoint every N steps (0: only at the end)")
        ->capture_default_str();
    cmd->add_option("--keep", a->keep, "with --save: keep the newest K complete checkpoints (0: all)")
        ->capture_default_str();
    cmd->add_option("--max-bad-steps", a->max_bad_steps,
                    "a step whose loss or gradient norm is not finite is not applied (weights, moments, EMA untouched) "
                    "and is reported; after N in a row the run stops with exit code 4, its last checkpoint intact "
                    "(0: never stop)")
        ->capture_default_str();
    cmd->add_option("--resume", a->resume,
                    "resume from a checkpoint directory, or the newest complete one under a --save directory; "
                    "--steps is the total to reach. The layout must match except --dp (the global batch --dp x "
                    "--microbatches must stay)");
    cmd->add_option("--metrics", a->metrics,
                    "append each step's metrics to this file as one JSON line, flushed at once (JSON Lines; a "
                    "killed run keeps every completed step)");
    cmd->add_option("--log-every", a->log_every, "print a progress line every N steps")->capture_default_str();
    cmd->add_option("--json", a->json,
                    "write per-step metrics (loss, max_vio, ...) to this file; - for standard output (progress lines "
                    "then go to standard error)");
}

}  // namespace

Command add_train(CLI::App& app) {
    auto a = std::make_shared<Args>();
    auto* cmd = app.add_subcommand("train",
                                   "Train the built-in DeepSeek-V3-style MoE model on the synthetic task.\n"
                                   "Example: duplex train --ranks 1 --model tiny --steps 300 --json metrics.json");
    add_layout_options(cmd, a.get());
    add_model_options(cmd, a.get());
    add_output_options(cmd, a.get());
    return [a, cmd] {
        json_target(a->json);
        check_writable(a->json, "--json");
        check_writable(a->metrics, "--metrics");
        check_writable(a->trace, "--trace");
        bool layout = cmd->count("--pp") || cmd->count("--dp") || cmd->count("--ep") || cmd->count("--schedule") ||
                      cmd->count("--vpp");
        bool distributed = layout || a->backend != "inproc" || a->mode != "math";
        if (cmd->count("--ranks")) {
            DUPLEX_CHECK_ARG(a->ranks == 1, "--ranks",
                             "{} ranks: give the layout with --pp, --dp and --ep instead (the rank count follows)",
                             a->ranks);
            DUPLEX_CHECK_ARG(!distributed, "--ranks",
                             "1 is the single-rank reference; drop it to run the layout of --pp/--dp/--ep/--schedule");
        }
        if (!distributed) {
            DUPLEX_CHECK_ARG(a->save.empty() && a->resume.empty(), a->save.empty() ? "--resume" : "--save",
                             "checkpoints belong to the pipeline trainer: give a layout (e.g. --pp 1 --dp 1)");
            return a->fp64 ? run_typed<double>(*a) : run_typed<float>(*a);
        }
        return a->fp64 ? run_distributed<double>(*a) : run_distributed<float>(*a);
    };
}

}  // namespace duplex::tools
