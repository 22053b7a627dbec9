// duplex schedule: generate, validate and draw a pipeline schedule.
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "parallel/schedule.hpp"
#include "tools/commands.hpp"

namespace duplex::tools {

namespace {

struct Args {
    std::string kind = "dualpipe";
    int pp = 8;
    int microbatches = 20;
    int vpp = 1;
    sched::Costs costs;
    std::string svg;
    std::string json;
    bool text = false;
};

nlohmann::json chunk_json(const sched::Chunk& c) { return {{"mb", c.mb}, {"stage", c.stage}, {"dir", c.dir}}; }

nlohmann::json instr_json(const sched::Instr& in) {
    nlohmann::json j = {{"op", sched::op_name(in.op)}};
    if (in.op == sched::Op::F || in.op == sched::Op::FB) j["f"] = chunk_json(in.f);
    if (in.op != sched::Op::F) j["b"] = chunk_json(in.b);
    return j;
}

int run(const Args& a) {
    sched::ScheduleKind kind = sched::kind_from_name(a.kind);
    sched::check_costs(a.costs);
    sched::Schedule s = sched::generate(kind, a.pp, a.microbatches, a.vpp);
    sched::Replay r = sched::replay(s, a.costs);
    double formula = sched::formula_bubble(kind, a.pp, a.costs, a.vpp);
    bool exact = sched::formula_is_exact(kind, a.costs);
    double max_idle = *std::max_element(r.idle.begin(), r.idle.end());
    if (!a.svg.empty()) write_text_file(a.svg, sched::render_svg(s, r, a.costs), "--svg");
    if (!a.json.empty()) {
        nlohmann::json j;
        j["kind"] = a.kind;
        j["pp"] = a.pp;
        j["vpp"] = a.vpp;
        j["num_ranks"] = s.num_ranks;
        j["microbatches"] = a.microbatches;
        j["costs"] = {{"f", a.costs.f}, {"b", a.costs.b}, {"w", a.costs.w}, {"fb", a.costs.fb_cost()}, {"p2p", a.costs.p2p}};
        j["makespan"] = r.makespan;
        j["idle"] = r.idle;
        j["busy"] = r.busy;
        j["peak_activations"] = r.peak_activations;
        j["param_copies"] = r.param_copies;
        j["formula_bubble"] = formula;
        j["formula_exact"] = exact;
        j["instructions"] = nlohmann::json::array();
        for (const auto& list : s.ranks) {
            nlohmann::json l = nlohmann::json::array();
            for (const auto& in : list) l.push_back(instr_json(in));
            j["instructions"].push_back(l);
        }
        write_text_file(a.json, j.dump() + "\n", "--json");
        note_written("JSON", a.json);
    }
    fmt::print(human(), "# {} schedule: PP={} on {} ranks, {} microbatches; costs F={} B={} W={} F&B={} p2p={}\n", a.kind, a.pp,
               s.num_ranks, a.microbatches, a.costs.f, a.costs.b, a.costs.w, a.costs.fb_cost(), a.costs.p2p);
    fmt::print(human(), "# {:>4} {:>4} {:>4} {:>4} {:>4} {:>4} {:>8} {:>8} {:>6} {:>7}\n", "rank", "F", "B", "W", "BW", "F&B",
               "busy", "idle", "peak", "params");
    for (int rank = 0; rank < s.num_ranks; ++rank) {
        sched::OpCounts c = sched::count_ops(s.ranks[rank]);
        fmt::print(human(), "  {:>4} {:>4} {:>4} {:>4} {:>4} {:>4} {:>8g} {:>8g} {:>6} {:>7}\n", rank, c.f, c.b, c.w, c.bw, c.fb,
                   r.busy[rank], r.idle[rank], r.peak_activations[rank], r.param_copies[rank]);
    }
    fmt::print(human(), "# makespan             : {:g}\n", r.makespan);
    fmt::print(human(), "# bubble per rank      : max {:g}, min {:g}\n", max_idle, *std::min_element(r.idle.begin(), r.idle.end()));
    fmt::print(human(), "# published formula    : {:g} ({})\n", formula,
               exact ? "exact for these costs"
               : a.costs.p2p != 0 ? "an estimate: exact only with p2p = 0"
                                  : "an estimate: exact only when B-W = F and p2p = 0");
    if (sched::is_interleaved(kind))
        fmt::print(human(), "# bubble fraction      : {:.4g} of the ideal step, (p - 1) / (v m) = {:.4g}\n",
                   max_idle / (r.makespan - max_idle), double(s.num_ranks - 1) / (double(a.vpp) * a.microbatches));
    if (a.text) fmt::print(human(), "\n{}", sched::render_text(s, r));
    if (!a.svg.empty()) fmt::print(human(), "# SVG timeline written to {}\n", a.svg);
    return 0;
}

}  // namespace

Command add_schedule(CLI::App& app) {
    auto a = std::make_shared<Args>();
    auto* cmd = app.add_subcommand("schedule",
                                   "Generate, validate and draw a pipeline schedule (1F1B, ZB1P, DualPipe, DualPipeV, "
                                   "interleaved 1F1B).\n"
                                   "Example: duplex schedule --kind dualpipe --pp 8 --microbatches 20 --svg dp.svg\n"
                                   "         duplex schedule --kind interleaved --pp 8 --vpp 2 --microbatches 8 --text");
    cmd->add_option("--kind", a->kind, "1f1b, zb1p, dualpipe, dualpipev or interleaved")->capture_default_str();
    cmd->add_option("--pp", a->pp, "pipeline stages of the model (dualpipev runs them on pp/2 ranks, interleaved on "
                    "pp/vpp)")
        ->capture_default_str();
    cmd->add_option("--vpp", a->vpp, "interleaved: model stages per rank (Megatron's PP 4 VP 2 is --pp 8 --vpp 2)")
        ->capture_default_str();
    cmd->add_option("--microbatches", a->microbatches, "microbatches per step")->capture_default_str();
    cmd->add_option("--cost-f", a->costs.f, "cost of a forward chunk")->capture_default_str();
    cmd->add_option("--cost-b", a->costs.b, "cost of a full backward chunk (input grad + weight grad)")
        ->capture_default_str();
    cmd->add_option("--cost-w", a->costs.w, "cost of the weight-gradient part of a backward")->capture_default_str();
    cmd->add_option("--cost-fb", a->costs.fb, "cost of an overlapped forward+backward pair (default F+B)");
    cmd->add_option("--p2p-latency", a->costs.p2p, "latency of a transfer between ranks")->capture_default_str();
    cmd->add_option("--svg", a->svg, "write an SVG timeline to this file");
    cmd->add_option("--json", a->json, "write the plan (instructions, makespan, idle, peak activations) as JSON to this "
                    "file; - for standard output (the table then goes to standard error)");
    cmd->add_flag("--text", a->text, "also draw the timeline in the terminal");
    return [a] {
        json_target(a->json);
        check_writable(a->json, "--json");
        return run(*a);
    };
}

}  // namespace duplex::tools
