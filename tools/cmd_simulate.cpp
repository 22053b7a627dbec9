// duplex simulate: predicted step time, bubbles, exposed communication, MFU, cost and memory of a model on a
// cluster with a parallel layout, from the executor's own schedules and the shared cost model; sweeps.
#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "runtime/sim/simulator.hpp"
#include "tools/commands.hpp"
#include "tools/lists.hpp"
#include "tools/sim_plots.hpp"

namespace duplex::tools {

namespace {

struct Args {
    std::string model = "deepseek-v3";
    std::string cluster = "h800x2048";
    std::string device;  // overrides the cluster's device preset
    std::string gpus = "0";  // overrides the cluster's GPU count (a list: one sweep per cluster size)
    int gpus_per_node = 0;
    std::string pp = "16", vpp = "1", ep = "64", schedule = "dualpipe", microbatches = "0";
    std::string tp = "1", cp = "1", etp = "1";
    int seq_len = 0;
    bool serial_grad_sync = false;
    int global_batch = 15360, mb_sequences = 1;
    bool no_fp8 = false, no_recompute = false, free_comm = false, ignore_memory = false, sequential_hops = false;
    bool sweep = false;
    int comm_sms = -1;
    int dense_layers = -1;
    std::string dispatch = "hierarchical";
    std::string partition = "balanced";
    double elem_bytes = 2, time_scale = 1;
    std::string svg, trace, json, csv = "sweep.csv";
    int top = 5;
};

std::string gb(double bytes) { return fmt::format("{:.1f}", bytes / 1e9); }

// One parallel layout of a run or a sweep.
struct Layout {
    std::string kind;
    int pp = 1, vpp = 1, ep = 1, mb = 0, tp = 1, cp = 1, etp = 1;
    std::string str() const {
        return fmt::format("{} tp {}{} pp {}{} ep {}{}{}", kind, tp, cp > 1 ? fmt::format(" cp {}", cp) : "", pp,
                           vpp > 1 ? fmt::format(" vpp {}", vpp) : "", ep, etp > 1 ? fmt::format(" etp {}", etp) : "",
                           mb > 0 ? fmt::format(" mb {}", mb) : "");
    }
};

SimOptions with_layout(SimOptions o, const Layout& l) {
    o.schedule = sched::kind_from_name(l.kind);
    o.pp = l.pp;
    o.vpp = l.vpp;
    o.ep = l.ep;
    o.microbatches = l.mb;
    o.tp = l.tp, o.cp = l.cp, o.etp = l.etp;
    return o;
}

SimOptions options_of(const Args& a) {
    SimOptions o;
    o.global_batch = a.global_batch;
    o.mb_sequences = a.mb_sequences;
    o.fp8 = !a.no_fp8;
    o.recompute = !a.no_recompute;
    o.dispatch = a.dispatch;
    o.partition = a.partition;
    o.pipelined_hops = !a.sequential_hops;
    o.comm_sms = a.comm_sms;
    o.elem_bytes = a.elem_bytes;
    o.free_communication = a.free_comm;
    o.ignore_memory = a.ignore_memory;
    o.seq_len = a.seq_len;
    o.overlap_grad_sync = !a.serial_grad_sync;
    return o;
}

void print_report(const SimResult& r, const ModelConfig& m, const ClusterConfig& cl, const Args& a,
                  const std::string& kind, double seconds) {
    fmt::print(human(), "# duplex simulate: {} ({:.0f}B parameters, {:.1f}B activated) on {} ({} GPUs, {} per node, {})\n",
               m.name, m.total_params() / 1e9, m.activated_params() / 1e9, cl.name, r.gpus, cl.device.gpus_per_node,
               cl.device.name);
    fmt::print(human(), "# {} {}PP={}{} x DP={} (EP={}{}, expert-DP={}), {} microbatches of {} x {} tokens per replica; {}{}, "
               "{} SMs for communication, {} dispatch\n",
               kind, (r.tp > 1 ? fmt::format("TP={} x ", r.tp) : "") + (r.cp > 1 ? fmt::format("CP={} x ", r.cp) : ""),
               r.pp, r.schedule.vpp > 1 ? fmt::format(" ({} ranks x VPP {})", r.pipeline_ranks, r.schedule.vpp) : "",
               r.dp, r.ep, r.etp > 1 ? fmt::format(", ETP={}", r.etp) : "", r.edp, r.microbatches, a.mb_sequences,
               r.seq_len, a.no_fp8 ? "BF16" : "FP8",
               a.no_recompute ? "" : " + recompute", a.comm_sms >= 0 ? a.comm_sms : cl.device.comm_sms, a.dispatch);
    auto mem = r.memory_per_gpu_bytes;
    std::string mem_line = fmt::format(
        "{} GB of {} GB: parameters {}, gradients {}, optimizer {}, activations {}, communication buffers {}",
        gb(r.memory_total_bytes), gb(r.memory_capacity_bytes), gb(mem["parameters"]), gb(mem["gradients"]),
        gb(mem["optimizer"]), gb(mem["activations"]), gb(mem["communication_buffers"]));
    if (!r.fits && !a.ignore_memory) {
        fmt::print(human(), "DOES NOT FIT   memory per GPU {}\n", mem_line);
        return;
    }
    fmt::print(human(), "step time      {:.4g} s (pipeline {:.4g} s + gradient sync {:.4g} s exposed of {:.4g} s{})\n",
               r.step_time_s, r.pipeline_s, r.exposed_comm_s.at("data_parallel"), r.grad_sync_s,
               a.serial_grad_sync ? ", after the pipeline" : ", started as each stage's weight gradients are done");
    fmt::print(human(), "bubble         {:.1f}% of the pipeline\n", 100 * r.bubble_fraction);
    fmt::print(human(), "exposed comm   expert {:.4g} s, pipeline {:.4g} s, data-parallel {:.4g} s{}{}\n",
               r.exposed_comm_s.at("expert"), r.exposed_comm_s.at("pipeline"), r.exposed_comm_s.at("data_parallel"),
               r.tp > 1 ? fmt::format(", tensor {:.4g} s", r.exposed_comm_s.at("tensor")) : "",
               r.cp > 1 ? fmt::format(", context {:.4g} s", r.exposed_comm_s.at("context")) : "");
    fmt::print(human(), "throughput     {:.0f} tokens/s/GPU, {:.0f} TFLOP/s/GPU achieved (MFU {:.1f}% of {:.0f} TFLOP/s BF16)\n",
               r.tokens_per_s_per_gpu, r.achieved_flops_s / 1e12, 100 * r.mfu, cl.device.bf16_flops / 1e12);
    fmt::print(human(), "cost           {:.1f}K GPU-hours per trillion tokens{}\n", r.gpu_hours_per_trillion_tokens / 1e3,
               m.name == "deepseek-v3" ? fmt::format(" (published for DeepSeek-V3 on H800: 180K, {:+.1f}%)",
                                                     100 * (r.gpu_hours_per_trillion_tokens / 180e3 - 1))
                                       : "");
    fmt::print(human(), "memory per GPU {}{}\n", mem_line, r.fits ? "" : "  -- DOES NOT FIT (simulated anyway: --ignore-memory)");
    int mid = r.pp / 2;
    fmt::print(human(), "stage {} chunk F {:.4g} ms, B {:.4g} ms (W {:.4g} ms); expert exchanges per chunk: forward {:.4g} ms, "
               "backward {:.4g} ms; P2P {:.4g} ms\n",
               mid, r.stage_costs[mid].f * 1e3, r.stage_costs[mid].b * 1e3, r.stage_costs[mid].w * 1e3,
               r.stage_ep_forward_s[mid] * 1e3, r.stage_ep_backward_s[mid] * 1e3, r.p2p_s * 1e3);
    fmt::print(human(), "# simulated in {:.3f} s\n", seconds);
}

// The timeline (SVG) and trace (Perfetto JSON) of one simulated layout.
void write_pictures(const SimResult& r, const Args& a) {
    // Times in units of the middle stage's forward chunk, so the drawing reads like the schedule figures.
    double unit = std::max(r.stage_costs[r.pp / 2].f, 1e-12);
    sched::Replay scaled = r.replay;
    scaled.makespan /= unit;
    for (auto& v : scaled.idle) v /= unit;
    for (auto& v : scaled.busy) v /= unit;
    for (auto& rank : scaled.spans)
        for (auto& sp : rank) sp.start /= unit, sp.end /= unit;
    const ChunkCosts& c = r.stage_costs[r.pp / 2];
    sched::Costs costs{1, c.b / unit, c.w / unit, -1, 0};
    if (!a.svg.empty()) {
        write_text_file(a.svg, sched::render_svg(r.schedule, scaled, costs), "--svg");
        fmt::print(human(), "# timeline written to {} (time unit: stage {} forward chunk, {:.2f} ms)\n", a.svg, r.pp / 2,
                   unit * 1e3);
    }
    if (!a.trace.empty()) {
        write_text_file(a.trace, sim_trace_json(r), "--trace");
        fmt::print(human(), "# trace written to {} (open in ui.perfetto.dev)\n", a.trace);
    }
}

// One layout: the report, the JSON, the pictures. Exit code 3 when it does not fit (unless --ignore-memory).
int run_one(const Args& a, const ModelConfig& m, const ClusterConfig& cl, const SimOptions& base, const Layout& l) {
    SimOptions o = with_layout(base, l);
    const std::string& kind = l.kind;
    Stopwatch sw;
    SimResult r = simulate(m, cl, o);
    double seconds = sw.seconds();
    print_report(r, m, cl, a, kind, seconds);
    if (!a.json.empty()) {
        write_text_file(a.json, simulation_json(r, m, cl, kind, r.fits || a.ignore_memory) + "\n", "--json");
        note_written("metrics", a.json);
    }
    if (!r.fits && !a.ignore_memory) {
        fmt::print(stderr,
                   "duplex simulate: the layout does not fit in {} GB per GPU (needs {} GB); change PP/EP/"
                   "microbatch size or pass --ignore-memory to simulate it anyway\n",
                   gb(r.memory_capacity_bytes), gb(r.memory_total_bytes));
        return 3;
    }
    if (!a.svg.empty() || !a.trace.empty()) write_pictures(r, a);
    return 0;
}

struct SweepRow {
    Layout l;
    SimResult r;
};

// Every sweep row of every cluster size, one CSV.
void write_sweep_csv(const Args& a, const std::vector<SweepRow>& rows) {
    std::string csv =
        "gpus,schedule,tp,cp,pp,vpp,ep,etp,dp,microbatches,step_time_s,bubble_fraction,mfu,tokens_per_s_per_gpu,"
        "gpu_hours_per_trillion_tokens,exposed_expert_s,exposed_pipeline_s,exposed_dp_s,exposed_tp_s,memory_gb,fits\n";
    for (const SweepRow& w : rows)
        csv += fmt::format("{},{},{},{},{},{},{},{},{},{},{:.6g},{:.4f},{:.4f},{:.1f},{:.1f},{:.4g},{:.4g},{:.4g},{:.4g},"
                           "{:.2f},{}\n",
                           w.r.gpus, w.l.kind, w.l.tp, w.l.cp, w.l.pp, w.l.vpp, w.l.ep, w.l.etp, w.r.dp,
                           w.r.microbatches, w.r.step_time_s, w.r.bubble_fraction, w.r.mfu, w.r.tokens_per_s_per_gpu,
                           w.r.gpu_hours_per_trillion_tokens, w.r.exposed_comm_s.at("expert"),
                           w.r.exposed_comm_s.at("pipeline"), w.r.exposed_comm_s.at("data_parallel"),
                           w.r.exposed_comm_s.at("tensor"), w.r.memory_total_bytes / 1e9, w.r.fits ? 1 : 0);
    write_text_file(a.csv, csv, "--csv");
}

// A sweep's summary: the layouts that could not run, the best that fit.
void report_sweep(const Args& a, const ModelConfig& m, const ClusterConfig& cl, const std::vector<SweepRow>& rows,
                  const std::vector<std::string>& rejected, size_t total, double seconds) {
    fmt::print(human(), "# swept {} layouts of {} on {} in {:.2f} s ({} could not run)\n", total, m.name, cl.name,
               seconds, rejected.size());
    for (size_t i = 0; i < std::min<size_t>(rejected.size(), 5); ++i) fmt::print(human(), "#   rejected: {}\n", rejected[i]);
    std::vector<const SweepRow*> fit;
    for (const SweepRow& w : rows)
        if (w.r.fits) fit.push_back(&w);
    std::sort(fit.begin(), fit.end(),
              [](const SweepRow* x, const SweepRow* y) { return x->r.tokens_per_s_per_gpu > y->r.tokens_per_s_per_gpu; });
    fmt::print(human(), "# best layouts that fit in {} GB ({} of {}):\n", gb(cl.device.memory_bytes), fit.size(), rows.size());
    fmt::print(human(), "{:>11} {:>3} {:>3} {:>4} {:>3} {:>4} {:>5} {:>4} {:>9} {:>7} {:>6} {:>10} {:>12} {:>8}\n", "schedule",
               "tp", "cp", "pp", "vpp", "ep", "dp", "mb", "step s", "bubble", "MFU", "tok/s/GPU", "GPU-h/T tok", "mem GB");
    for (size_t i = 0; i < std::min<size_t>(fit.size(), size_t(a.top)); ++i) {
        const SweepRow& w = *fit[i];
        fmt::print(human(), "{:>11} {:>3} {:>3} {:>4} {:>3} {:>4} {:>5} {:>4} {:>9.3f} {:>6.1f}% {:>5.1f}% {:>10.0f} {:>11.1f}K "
                   "{:>8.1f}\n",
                   w.l.kind, w.l.tp, w.l.cp, w.l.pp, w.l.vpp, w.l.ep, w.r.dp, w.r.microbatches, w.r.step_time_s, 100 * w.r.bubble_fraction, 100 * w.r.mfu,
                   w.r.tokens_per_s_per_gpu, w.r.gpu_hours_per_trillion_tokens / 1e3, w.r.memory_total_bytes / 1e9);
    }
}

// Every combination of the lists; layouts that cannot run are listed with the reason, the rest go to the CSV.
// VPP other than 1 belongs to the interleaved schedule only: other kinds take VPP 1 once.
std::vector<SweepRow> run_sweep(const Args& a, const ModelConfig& m, const ClusterConfig& cl, const SimOptions& base,
                                const std::vector<Layout>& layouts) {
    std::vector<SweepRow> rows;
    std::vector<std::string> rejected;
    Stopwatch sw;
    size_t done = 0;
    for (const Layout& l : layouts) {
        SimOptions o = with_layout(base, l);
        o.ignore_memory = true;  // the CSV shows the time of every layout, with whether it fits
        ++done;
        try {
            rows.push_back({l, simulate(m, cl, o)});
        } catch (const ConfigError& e) {
            rejected.push_back(fmt::format("{}: {}", l.str(), e.what()));
        }
        if (done % 100 == 0) fmt::print(stderr, "# sweep: {}/{} layouts, {:.1f} s\n", done, layouts.size(), sw.seconds());
    }
    report_sweep(a, m, cl, rows, rejected, layouts.size(), sw.seconds());
    return rows;
}

std::string layout_label(const Layout& l) {
    std::string s = l.str();
    return s.substr(l.kind.size() + 1);  // the schedule is the colour
}

// The pictures of a sweep: one cluster size, every layout (throughput against memory); several, the best fitting
// layout of each size.
void write_sweep_svg(const Args& a, const ModelConfig& m, const std::vector<std::vector<SweepRow>>& by_size,
                     const std::vector<ClusterConfig>& clusters) {
    if (a.svg.empty()) return;
    if (by_size.size() == 1) {
        std::vector<PlotPoint> pts;
        for (const SweepRow& w : by_size[0])
            pts.push_back({w.r.memory_total_bytes / 1e9, w.r.tokens_per_s_per_gpu, w.l.kind, layout_label(w.l), w.r.fits});
        write_text_file(a.svg, layouts_svg(fmt::format("{} on {}: {} layouts that run", m.name, clusters[0].name, pts.size()),
                                           pts, clusters[0].device.memory_bytes / 1e9),
                        "--svg");
    } else {
        std::vector<PlotPoint> pts;
        for (size_t i = 0; i < by_size.size(); ++i) {
            const SweepRow* best = nullptr;
            for (const SweepRow& w : by_size[i])
                if (w.r.fits && (!best || w.r.tokens_per_s_per_gpu > best->r.tokens_per_s_per_gpu)) best = &w;
            if (best) pts.push_back({double(clusters[i].gpus), best->r.tokens_per_s_per_gpu, best->l.kind,
                                     layout_label(best->l), true});
        }
        write_text_file(a.svg, scaling_svg(fmt::format("{}: the best layout at each cluster size", m.name), pts), "--svg");
    }
    fmt::print(human(), "# plot written to {}\n", a.svg);
}

int run(const Args& a) {
    check_writable(a.svg, "--svg");
    check_writable(a.trace, "--trace");
    check_writable(a.json, "--json");
    ModelConfig m = ModelConfig::preset(a.model);
    if (a.dense_layers >= 0) {
        DUPLEX_CHECK_ARG(a.dense_layers <= m.layers, "--dense-layers", "{} exceeds the {} layers", a.dense_layers,
                         m.layers);
        m.dense_layers = a.dense_layers;
    }
    auto gpus = int_list(a.gpus, "--gpus");
    auto pps = int_list(a.pp, "--pp"), eps = int_list(a.ep, "--ep"), mbs = int_list(a.microbatches, "--microbatches");
    auto vpps = int_list(a.vpp, "--vpp"), tps = int_list(a.tp, "--tp"), cps = int_list(a.cp, "--cp");
    auto etps = int_list(a.etp, "--etp");
    auto kinds = split_list(a.schedule);
    for (const auto& k : kinds) sched::kind_from_name(k);  // ConfigError for an unknown name
    std::vector<Layout> layouts;
    for (const auto& k : kinds) {
        // A VPP list sweeps the interleaved schedule; the other kinds run once with one stage per rank (a single
        // --vpp other than 1 with them is refused by the simulation, naming it).
        bool interleaved = sched::is_interleaved(sched::kind_from_name(k));
        std::vector<int> kind_vpps = interleaved || vpps.size() == 1 ? vpps : std::vector<int>{1};
        for (int tp : tps)
            for (int cp : cps)
                for (int pp : pps)
                    for (int vpp : kind_vpps)
                        for (int ep : eps)
                            for (int etp : etps)
                                for (int mb : mbs) layouts.push_back({k, pp, vpp, ep, mb, tp, cp, etp});
    }
    SimOptions base = options_of(a);
    if (!a.sweep && layouts.size() == 1 && gpus.size() == 1)
        return run_one(a, m, make_cluster(a.cluster, a.device, gpus[0], a.gpus_per_node, a.time_scale), base,
                       layouts[0]);
    std::vector<std::vector<SweepRow>> by_size;
    std::vector<ClusterConfig> clusters;
    std::vector<SweepRow> all;
    for (int g : gpus) {
        clusters.push_back(make_cluster(a.cluster, a.device, g, a.gpus_per_node, a.time_scale));
        by_size.push_back(run_sweep(a, m, clusters.back(), base, layouts));
        all.insert(all.end(), by_size.back().begin(), by_size.back().end());
    }
    write_sweep_csv(a, all);
    fmt::print(human(), "# CSV: {}\n", a.csv);
    write_sweep_svg(a, m, by_size, clusters);
    return 0;
}

}  // namespace

Command add_simulate(CLI::App& app) {
    auto a = std::make_shared<Args>();
    auto* cmd = app.add_subcommand(
        "simulate",
        "Predict step time, bubbles, exposed communication, MFU, GPU-hours and memory of a model on a cluster by "
        "replaying the executor's schedules against the cost model. Comma lists in --pp/--vpp/--ep/--microbatches/"
        "--schedule sweep every combination to a CSV and print the best layouts that fit.");
    cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a later flag overrides
    cmd->add_option("--model", a->model, "deepseek-v3, small, tiny, or a model .json")->capture_default_str();
    cmd->add_option("--cluster", a->cluster, "DEVICExGPUS (h800x2048, h100x1024, h200x64, ...) or a cluster .json")
        ->capture_default_str();
    cmd->add_option("--device", a->device, "override the cluster's device preset (h800, h100, h200, or a .json)");
    cmd->add_option("--gpus", a->gpus,
                    "override the cluster's GPU count (a comma list sweeps cluster sizes; --svg then draws the best "
                    "layout's throughput against the GPUs)");
    cmd->add_option("--gpus-per-node", a->gpus_per_node, "override GPUs per node (default 8)");
    cmd->add_option("--pp", a->pp,
                    "pipeline stages of the model (dualpipev: on pp/2 ranks, interleaved: on pp/vpp; a comma list "
                    "sweeps)")
        ->capture_default_str();
    cmd->add_option("--vpp", a->vpp,
                    "interleaved: model stages per rank (Megatron's PP 8 VP 4 is --pp 32 --vpp 4; a comma list sweeps)")
        ->capture_default_str();
    cmd->add_option("--ep", a->ep, "expert parallelism inside a stage's TP x CP x DP ranks (a comma list sweeps)")
        ->capture_default_str();
    cmd->add_option("--tp", a->tp,
                    "tensor parallelism with sequence parallelism, inside a node; must divide the heads, the hidden "
                    "and FFN sizes and the sequence (a comma list sweeps)")
        ->capture_default_str();
    cmd->add_option("--cp", a->cp, "context parallelism (ring attention); 2 x CP must divide the sequence (a comma "
                                   "list sweeps)")
        ->capture_default_str();
    cmd->add_option("--etp", a->etp, "the routed experts' tensor parallelism, apart from --tp (a comma list sweeps)")
        ->capture_default_str();
    cmd->add_option("--seq-len", a->seq_len, "tokens per sequence (0: the model's)")->capture_default_str();
    cmd->add_flag("--serial-grad-sync", a->serial_grad_sync,
                  "the gradient synchronization after the pipeline (default: each stage's starts when its last weight "
                  "gradient is done)");
    cmd->add_option("--schedule", a->schedule, "1f1b, zb1p, dualpipe, dualpipev, interleaved (a comma list sweeps)")
        ->capture_default_str();
    cmd->add_option("--microbatches", a->microbatches,
                    "per DP replica; 0: global batch / (DP x sequences per microbatch) (a comma list sweeps)")
        ->capture_default_str();
    cmd->add_option("--global-batch", a->global_batch, "sequences per step")->capture_default_str();
    cmd->add_option("--mb-sequences", a->mb_sequences, "sequences per microbatch")->capture_default_str();
    cmd->add_flag("--no-fp8", a->no_fp8, "linear layers in BF16 (default: FP8 GEMMs, FP8 dispatch)");
    cmd->add_flag("--no-recompute", a->no_recompute, "keep every activation (default: recompute the cheap ones)");
    cmd->add_option("--comm-sms", a->comm_sms, "SMs reserved for expert communication (default: the device's, 20)");
    cmd->add_option("--dispatch", a->dispatch, "hierarchical (node-limited, two hops) or flat")->capture_default_str();
    cmd->add_option("--partition", a->partition,
                    "layers per stage: balanced (minimize the slowest stage) or uniform (as the executor splits)")
        ->capture_default_str();
    cmd->add_flag("--sequential-hops", a->sequential_hops,
                  "hierarchical exchanges: the intra-node hop after the inter-node one (the CPU executor), not "
                  "pipelined with it (GPU kernels)");
    cmd->add_option("--dense-layers", a->dense_layers, "override the model's leading dense layers");
    cmd->add_option("--elem-bytes", a->elem_bytes, "bytes per activation element on the wire (2: BF16; 4 to match "
                                                   "fp32 emulate runs)")
        ->capture_default_str();
    cmd->add_option("--time-scale", a->time_scale, "multiply every duration (to compare with emulate mode)")
        ->capture_default_str();
    cmd->add_flag("--free-comm", a->free_comm, "every transfer and exchange costs nothing (validation)");
    cmd->add_flag("--ignore-memory", a->ignore_memory, "simulate a layout that does not fit in GPU memory");
    cmd->add_option("--svg", a->svg,
                    "one layout: the replayed pipeline as an SVG timeline; a sweep: every layout's tokens/s/GPU against "
                    "its memory per GPU, the Pareto front and the chosen layout marked; a --gpus list: the best "
                    "throughput against cluster size");
    cmd->add_option("--trace", a->trace, "write the replayed pipeline as Chrome-trace JSON");
    cmd->add_option("--json", a->json, "write the result as JSON to this file; - for standard output");
    cmd->add_flag("--sweep", a->sweep, "sweep mode even for single values (lists in --pp/--ep/--microbatches/--schedule "
                                     "sweep by themselves)");
    cmd->add_option("--csv", a->csv, "sweep: where the CSV goes")->capture_default_str();
    cmd->add_option("--top", a->top, "sweep: how many of the best layouts to print")->capture_default_str();
    return [a] {
        json_target(a->json);
        return run(*a);
    };
}

}  // namespace duplex::tools
