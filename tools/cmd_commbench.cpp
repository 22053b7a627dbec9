// duplex commbench: nccl-tests-style communication benchmark on any backend.
#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "comm/bench.hpp"
#include "comm/launch.hpp"
#include "comm/inproc/inproc_transport.hpp"
#include "core/error.hpp"
#include "core/host_memory.hpp"
#include "tools/commands.hpp"
#include "tools/commbench_pairs.hpp"
#include "tools/gpu_commbench.hpp"
#include "tools/lists.hpp"
#include "tools/sim_plots.hpp"
#ifdef DUPLEX_HAVE_NCCL
#include "tools/nccl_commbench.hpp"
#endif

namespace duplex::tools {

namespace {

struct Args {
    LaunchOptions launch;
    CommBenchOptions bench;
    GpuCommBenchOptions gpu;  // --backend cuda
    std::string sms = "4,8,16,20,32";
    bool ranks_given = false;
    int check = 1;
    std::string json;
    bool ceiling = true;
    PairsCommand pairs;  // --op pairs
    std::string pair_bytes = "4M";
    std::string svg;     // pairs: the heatmap; other ops: bus bandwidth (and p2p latency) against size
};

void print_header(const CommBenchResult& r, const Args& a) {
    fmt::print(human(), "# duplex commbench: {} on {} ranks ({} node{}), backend {}, {} iterations after {} warm-up\n",
               a.bench.op, r.ranks, r.nodes, r.nodes == 1 ? "" : "s", r.backend, a.bench.iters, a.bench.warmup);
    if (a.bench.op == "alltoallv") fmt::print(human(), "# per-peer counts: Zipf skew {} seed {}\n", a.bench.skew, a.bench.seed);
    fmt::print(human(), "#\n# {:>10} {:>12} {:>8} {:>10} {:>11} {:>11} {:>7}{}\n", "size(B)", "count", "type", "time(us)",
               "algbw(GB/s)", "busbw(GB/s)", "#wrong", a.bench.compare_mpi ? "    mpi(us)  ours/mpi" : "");
}

void print_row(const CommBenchRow& row, const Args& a) {
    std::string extra;
    if (a.bench.compare_mpi)
        extra = fmt::format(" {:>10.2f} {:>9.2f}", row.mpi_time_us, row.mpi_time_us > 0 ? row.time_us / row.mpi_time_us : 0);
    fmt::print(human(), "  {:>10} {:>12} {:>8} {:>10.2f} {:>11.3f} {:>11.3f} {:>7}{}\n", row.bytes, row.count, row.type,
               row.time_us, row.algbw_gbs, row.busbw_gbs, row.wrong, extra);
    std::fflush(human());
}

int run_cuda(Args& a) {
#ifdef DUPLEX_HAVE_CUDA
    GpuCommBenchOptions& o = a.gpu;
    o.op = a.bench.op;
    o.ranks = a.ranks_given ? a.launch.ranks : 8;
    o.nodes = std::max(1, a.launch.virtual_nodes);
    o.min_bytes = a.bench.min_bytes;
    o.max_bytes = a.bench.max_bytes;
    o.factor = a.bench.factor;
    o.iters = a.bench.iters;
    o.warmup = a.bench.warmup;
    o.check = a.check != 0;
    o.seed = a.bench.seed;
    o.json = a.json;
    o.sms = int_list(a.sms, "--sms");
    check_writable(a.json, "--json");
    return run_gpu_commbench(o);
#else
    (void)a;
    throw ConfigError("--backend", "cuda is not built into this binary (no nvcc at configure time)");
#endif
}

int run_nccl(Args& a) {
#ifdef DUPLEX_HAVE_NCCL
    NcclCommBenchOptions o;
    o.bench = a.bench;
    o.bench.check = a.check != 0;
    o.ranks = a.ranks_given ? a.launch.ranks : 0;
    o.json = a.json;
    validate(o.bench);
    check_writable(a.json, "--json");
    return run_nccl_commbench(o);
#else
    (void)a;
    throw ConfigError("--backend", "nccl is not built into this binary (no CUDA/NCCL at configure time)");
#endif
}

// The size sweep as pictures: bus bandwidth per size (ours, Open MPI's with --compare-mpi, the copy ceiling dashed);
// p2p also its latency (time per message) under it.
std::string sweep_svg(const CommBenchResult& r, const Args& a, double ceiling_gbs) {
    Series ours{fmt::format("{} busbw", r.backend), {}, false}, mpi{"Open MPI busbw", {}, false};
    Series ours_t{fmt::format("{} time", r.backend), {}, false}, mpi_t{"Open MPI time", {}, false};
    Series ceiling{"copy ceiling (memcpy / ranks)", {}, true};
    for (const CommBenchRow& row : r.rows) {
        double x = double(row.bytes);
        ours.points.push_back({x, row.busbw_gbs});
        ours_t.points.push_back({x, row.time_us});
        if (a.bench.compare_mpi && row.mpi_time_us > 0) {
            mpi.points.push_back({x, row.busbw_gbs * row.time_us / row.mpi_time_us});
            mpi_t.points.push_back({x, row.mpi_time_us});
        }
        if (ceiling_gbs > 0) ceiling.points.push_back({x, ceiling_gbs});
    }
    std::vector<Series> bw{ours}, lat{ours_t};
    if (!mpi.points.empty()) bw.push_back(mpi), lat.push_back(mpi_t);
    if (!ceiling.points.empty()) bw.push_back(ceiling);
    std::string title =
        fmt::format("duplex commbench {}: {} ranks, {} node{}", r.op, r.ranks, r.nodes, r.nodes == 1 ? "" : "s");
    std::vector<std::string> charts{lines_svg(title, "bus bandwidth (GB/s)", bw, false)};
    if (r.op == "p2p") charts.push_back(lines_svg(title + ": latency", "time per message (us, log)", lat, true));
    return stack_svg(charts);
}

// --json: the run's rows and totals (the fields duplex.commbench returns per row).
void write_json(const CommBenchResult& result, const Args& a, double ceiling_gbs, double per_rank_ceiling) {
    nlohmann::json j;
    j["op"] = result.op;
    j["backend"] = result.backend;
    j["ranks"] = result.ranks;
    j["nodes"] = result.nodes;
    j["iters"] = a.bench.iters;
    j["warmup"] = a.bench.warmup;
    j["avg_busbw_gbs"] = result.avg_busbw_gbs;
    if (ceiling_gbs > 0) {
        j["memcpy_aggregate_gbs"] = ceiling_gbs;
        j["copy_ceiling_busbw_gbs"] = per_rank_ceiling;
    }
    j["bytes_sent_rank0"] = {{"intra_node", result.bytes_sent.intra_node},
                             {"inter_node", result.bytes_sent.inter_node}};
    for (auto& row : result.rows) {
        nlohmann::json r = {{"size", row.bytes},        {"count", row.count},         {"type", row.type},
                            {"time_us", row.time_us},   {"algbw_gbs", row.algbw_gbs}, {"busbw_gbs", row.busbw_gbs},
                            {"wrong", row.wrong}};
        if (a.bench.compare_mpi) r["mpi_time_us"] = row.mpi_time_us;
        if (ceiling_gbs > 0) r["fraction_of_ceiling"] = row.busbw_gbs / per_rank_ceiling;
        j["rows"].push_back(r);
    }
    write_text_file(a.json, j.dump(2) + "\n", "--json");
    note_written("JSON", a.json);
}

int run(Args& a) {
    if (a.bench.op == "pairs") {
        a.pairs.pairs.large = parse_size(a.pair_bytes, "--pair-bytes");
        a.pairs.pairs.iters = a.bench.iters;
        a.pairs.pairs.warmup = a.bench.warmup;
        a.pairs.json = a.json;
        a.pairs.svg = a.svg;
        DUPLEX_CHECK_ARG(a.launch.backend != "cuda", "--op",
                         "pairs runs on inproc, mpi, ucx and nccl (device buffers, one GPU per rank); the cuda "
                         "backend's virtual ranks share one GPU, so they have no links of their own to measure");
        validate(a.pairs.pairs, backend_is_multiprocess(a.launch.backend) ? 2 : a.launch.ranks);
        for (const std::string* f : {&a.pairs.json, &a.pairs.csv, &a.pairs.svg}) check_writable(*f, "--json/--csv/--svg");
        return run_pairs_command(a.launch, a.pairs);
    }
    if (a.launch.backend == "cuda") return run_cuda(a);
    if (a.launch.backend == "nccl") return run_nccl(a);
    a.bench.check = a.check != 0;
    validate(a.bench);
    check_writable(a.json, "--json");
    check_writable(a.svg, "--svg");
    bool multiprocess = backend_is_multiprocess(a.launch.backend);
    if (multiprocess && a.launch.ranks != 1)
        throw ConfigError("--ranks", fmt::format("backend {} runs one rank per process: use mpirun -np {} duplex commbench "
                                                 "--backend {}", a.launch.backend, a.launch.ranks, a.launch.backend));
    // Before anything is allocated: every rank in this process holds a send and a receive buffer of up to -e bytes
    // (the check pattern for #wrong is computed in place); alltoallv also builds every rank's per-peer counts.
    {
        ProcessEnv env = multiprocess ? process_env() : ProcessEnv{};
        int here = multiprocess ? std::max(1, env.local_size) : a.launch.ranks;
        int world = multiprocess ? env.world_size : a.launch.ranks;
        if (!multiprocess) check_inproc_ranks(here);
        double buffers = 2.0 * double(a.bench.max_bytes) * here;
        double counts = a.bench.op == "alltoallv" ? 8.0 * world * double(world) * here : 0.0;
        check_host_memory(buffers + counts, counts > buffers ? "--ranks" : "-e",
                          fmt::format("{} rank{} in this {} x a send and a receive buffer of {}{}", here,
                                      here == 1 ? "" : "s", multiprocess ? "node" : "process",
                                      human_bytes(double(a.bench.max_bytes)),
                                      counts > 0 ? fmt::format(", and {} of alltoallv counts", human_bytes(counts)) : ""));
    }
    double ceiling_gbs = 0;
    int cores = std::max(1u, std::thread::hardware_concurrency());
    if (a.launch.backend == "inproc" && a.ceiling) {
        ceiling_gbs = measure_memcpy_bandwidth(cores) / 1e9;
    }
    CommBenchResult result;
    bool header = false;
    launch(a.launch, [&](const std::shared_ptr<Communicator>& comm) {
        auto on_row = [&](const CommBenchRow& row) {
            if (!header) {
                CommBenchResult h;
                h.ranks = comm->size();
                h.nodes = comm->topology().num_nodes();
                h.backend = comm->backend_description();
                print_header(h, a);
                header = true;
            }
            print_row(row, a);
        };
        CommBenchResult r = run_commbench(*comm, a.bench, on_row);
        if (comm->rank() == 0) result = std::move(r);
    });
    if (result.ranks == 0) return 0;  // not rank 0 of a process backend
    uint64_t wrong = 0;
    for (auto& row : result.rows) wrong += row.wrong;
    fmt::print(human(), "# Out of bounds values : {} {}\n", wrong, wrong ? "FAILED" : "OK");
    fmt::print(human(), "# Avg bus bandwidth    : {:.3f} GB/s\n", result.avg_busbw_gbs);
    double per_rank_ceiling = ceiling_gbs / result.ranks;
    if (ceiling_gbs > 0) {
        fmt::print(human(), "# Copy ceiling         : memcpy {:.2f} GB/s over {} cores / {} ranks = {:.3f} GB/s busbw per rank\n",
                   ceiling_gbs, cores, result.ranks, per_rank_ceiling);
        if (!result.rows.empty())
            fmt::print(human(), "# busbw / ceiling      : {:.2f} at {} bytes\n", result.rows.back().busbw_gbs / per_rank_ceiling,
                       result.rows.back().bytes);
    }
    fmt::print(human(), "# Bytes sent by rank 0 : intra-node {}, inter-node {}\n", result.bytes_sent.intra_node,
               result.bytes_sent.inter_node);
    if (!a.svg.empty()) {
        write_text_file(a.svg, sweep_svg(result, a, per_rank_ceiling), "--svg");
        fmt::print(human(), "# plot written to {}\n", a.svg);
    }
    if (!a.json.empty()) write_json(result, a, ceiling_gbs, per_rank_ceiling);
    return wrong ? 1 : 0;
}

}  // namespace

Command add_commbench(CLI::App& app) {
    auto a = std::make_shared<Args>();
    auto* cmd = app.add_subcommand("commbench",
                                   "Measure p2p, all-to-all(v) and the DP collectives (nccl-tests layout).\n"
                                   "Examples:\n"
                                   "  duplex commbench --ranks 8 --op alltoall -b 1K -e 64M\n"
                                   "  mpirun -np 8 duplex commbench --backend ucx --op alltoallv --compare-mpi\n"
                                   "  duplex commbench --backend nccl --op allreduce -b 1M -e 1G\n"
                                   "  duplex commbench --backend cuda --op dispatch --ranks 8 --sms 4,8,16,20,32\n"
                                   "  duplex commbench --ranks 8 --virtual-nodes 2 --op pairs --svg pairs.svg");
    auto min_b = std::make_shared<std::string>("1K"), max_b = std::make_shared<std::string>("64M");
    cmd->add_option("--backend", a->launch.backend,
                    "inproc (threads), mpi or ucx (processes under mpirun), nccl (device buffers, one rank per "
                    "GPU of this machine, as threads), or cuda (dispatch/combine between virtual ranks on one GPU)")
        ->capture_default_str();
    cmd->add_option("--op", a->bench.op,
                    "p2p, alltoall, alltoallv, allgather, reducescatter, allreduce; pairs (every ordered rank pair's "
                    "bandwidth and latency, one pair at a time and all at once, the slow pairs named); with --backend "
                    "cuda: dispatch, combine")
        ->capture_default_str();
    cmd->add_option("--pair-bytes", a->pair_bytes, "pairs: message size for bandwidth")->capture_default_str();
    cmd->add_option("--latency-bytes", a->pairs.pairs.small, "pairs: message size for latency")->capture_default_str();
    cmd->add_option("--repeat", a->pairs.pairs.repeat,
                    "pairs: passes over every pair; each cell is the median of its passes (3 or more keeps a pair "
                    "that stalled once on a busy machine from being named)")
        ->capture_default_str();
    cmd->add_option("--slow-factor", a->pairs.pairs.slow_factor,
                    "pairs: a pair is slow below the median bandwidth / this or above the median latency x this")
        ->capture_default_str();
    cmd->add_option("--csv", a->pairs.csv, "pairs: one row per ordered pair (nodes, bandwidths, latency, slow)");
    cmd->add_option("--svg", a->svg,
                    "an SVG: bus bandwidth against size (with Open MPI's line after --compare-mpi, the copy ceiling "
                    "dashed; p2p adds latency against size); pairs: a rank x rank heatmap grouped by node");
    cmd->add_option("--ranks", a->launch.ranks, "ranks as threads (inproc; nccl: default one per GPU; cuda: virtual ranks)")->capture_default_str();
    cmd->add_option("-b,--minbytes", *min_b, "smallest size (bytes; K, M, G suffixes)")->capture_default_str();
    cmd->add_option("-e,--maxbytes", *max_b, "largest size")->capture_default_str();
    cmd->add_option("-f,--stepfactor", a->bench.factor, "multiply the size by this each step")->capture_default_str();
    cmd->add_option("-n,--iters", a->bench.iters, "timed iterations per size")->capture_default_str();
    cmd->add_option("-w,--warmup_iters", a->bench.warmup, "untimed warm-up iterations per size")->capture_default_str();
    cmd->add_option("-c,--check", a->check, "1: verify every element against a reference pattern (#wrong)")
        ->capture_default_str();
    cmd->add_option("--skew", a->bench.skew, "alltoallv: Zipf exponent of per-peer counts (0 = uniform)")
        ->capture_default_str();
    cmd->add_option("--seed", a->bench.seed, "alltoallv: seed of the per-peer counts")->capture_default_str();
    cmd->add_option("--virtual-nodes", a->launch.virtual_nodes,
                    "split ranks into this many virtual nodes (intra/inter-node byte counters; cuda: the node-limited "
                    "path, one crossing per token and node through a relay row; combine sums inside each node before "
                    "crossing back)");
    cmd->add_option("--timeout", a->launch.timeout_s, "seconds before an operation times out (default: DUPLEX_COMM_TIMEOUT)");
    cmd->add_flag("--compare-mpi", a->bench.compare_mpi,
                  "also time plain MPI (MPI_Alltoallv, ...) on the same buffers; needs mpirun");
    cmd->add_flag("--plain-buffers", a->bench.plain_buffers,
                  "buffers from the system allocator instead of the backend's (ucx: its shared arena, whose large "
                  "same-host messages are one memcpy out of a mapping; plain memory is read with process_vm_readv)");
    cmd->add_flag("--bind", a->launch.bind_cores, "bind each rank to a core (hwloc)");
    cmd->add_flag("!--no-ceiling", a->ceiling, "inproc: skip measuring the memcpy copy ceiling");
    cmd->add_option("--json", a->json, "also write the rows as JSON to this file; - for standard output");
    cmd->add_option("--sms", a->sms, "cuda: SM budgets of the exchange kernel to measure")->capture_default_str();
    cmd->add_option("--hidden", a->gpu.hidden, "cuda: row width in elements")->capture_default_str();
    cmd->add_option("--dtype", a->gpu.dtype,
                    "cuda: row type: f32, bf16, or fp8 (e4m3 with one fp32 scale per 128 columns; dispatch only, "
                    "--hidden a multiple of 128)")
        ->capture_default_str();
    cmd->add_option("--top-k", a->gpu.top_k, "cuda: slots per token (to distinct virtual ranks)")->capture_default_str();
    return [a, min_b, max_b, cmd] {
        json_target(a->json);
        a->bench.min_bytes = parse_size(*min_b, "-b");
        a->bench.max_bytes = parse_size(*max_b, "-e");
        a->ranks_given = cmd->get_option("--ranks")->count() > 0;
        return run(*a);
    };
}

}  // namespace duplex::tools
