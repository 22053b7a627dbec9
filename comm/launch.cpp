#include "comm/launch.hpp"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <unistd.h>

#include "comm/inproc/inproc_transport.hpp"
#include "comm/tcp_store.hpp"
#include "core/error.hpp"
#include "core/knobs.hpp"
#include "core/log.hpp"
#ifdef DUPLEX_HAVE_MPI
#include "comm/mpi/mpi_transport.hpp"
#endif
#ifdef DUPLEX_HAVE_UCX
#include "comm/ucx/ucx_transport.hpp"
#endif
#ifdef DUPLEX_HAVE_NCCL
#include "comm/nccl/nccl_channels.hpp"
#endif

namespace duplex {

namespace {

const Knob<std::string> kStoreToken("DUPLEX_STORE_TOKEN", "duplex",
                                    "shared secret every rank presents to the TCP store on connect");

const char* env(const char* name) {
    const char* v = std::getenv(name);
    return (v && *v) ? v : nullptr;
}

int env_int(const char* name, const char* text) {
    try {
        size_t used = 0;
        int v = std::stoi(text, &used);
        if (used == std::string(text).size()) return v;
    } catch (const std::exception&) {
    }
    throw ConfigError(name, fmt::format("expected an integer, got '{}'", text));
}

Topology make_topology(const LaunchOptions& o, const Transport& t) {
    if (o.virtual_nodes > 0) return Topology::virtual_nodes(t.size(), o.virtual_nodes);
    return Topology::from_hostnames(t.hostnames());
}

// The transport a rank's communicator runs on, made from its control transport: the transport itself, or nccl
// layered over it.
using Layer = std::function<std::shared_ptr<Transport>(std::shared_ptr<Transport>)>;

void launch_inproc(const LaunchOptions& o, const RankFn& fn, const Layer& layer = nullptr) {
    auto fabric = InprocFabric::create(o.ranks);
    if (o.virtual_nodes > 0) Topology::virtual_nodes(o.ranks, o.virtual_nodes);  // validate before starting
    std::mutex mutex;
    std::exception_ptr first;
    std::vector<std::thread> threads;
    threads.reserve(o.ranks);
    for (int r = 0; r < o.ranks; ++r) {
        threads.emplace_back([&, r] {
            std::shared_ptr<Transport> transport = fabric->transport(r);
            try {
                if (layer) transport = layer(transport);
                if (o.bind_cores) bind_thread_to_core(r);
                auto comm = Communicator::create(transport, make_topology(o, *transport), {o.timeout_s});
                fn(comm);
            } catch (const std::exception& e) {
                {
                    std::lock_guard<std::mutex> lock(mutex);
                    if (!first) first = std::current_exception();
                }
                transport->abort(e.what());
            }
        });
    }
    for (auto& t : threads) t.join();
    if (first) std::rethrow_exception(first);
}

#ifdef DUPLEX_HAVE_NCCL
// nccl: payloads through NCCL on `device`, tags matched over `control` (comm/rendezvous_transport.hpp).
std::shared_ptr<Transport> layer_nccl(std::shared_ptr<Transport> control, std::shared_ptr<Store> store, int device,
                                      double timeout_s) {
    auto channels = make_nccl_channels(std::move(store), control->rank(), control->size(), device, "nccl/channel",
                                       timeout_s);
    return std::make_shared<RendezvousTransport>(std::move(control), std::move(channels), "nccl");
}

// Ranks as threads, one GPU each, the control messages in process.
void launch_nccl_threads(const LaunchOptions& o, const RankFn& fn) {
    int devices = visible_cuda_devices();
    if (devices == 0) throw ConfigError("--backend", "nccl needs a CUDA device and this machine shows none");
    if (o.ranks > devices)
        throw ConfigError("--ranks", fmt::format("backend nccl puts each rank on a GPU of its own: {} ranks, {} GPU{} "
                                                 "visible (NCCL refuses two ranks of a communicator on one device)",
                                                 o.ranks, devices, devices == 1 ? "" : "s"));
    auto store = std::make_shared<InMemoryStore>();
    launch_inproc(o, fn, [&](std::shared_ptr<Transport> control) {
        int device = control->rank();
        return layer_nccl(std::move(control), store, device, o.timeout_s);
    });
}
#endif

}  // namespace

std::string slurm_first_host(const std::string& nodelist) {
    // "gpu-a[003-005,009],gpu-b7" -> "gpu-a003": the first entry at bracket depth 0, its first range's start.
    int depth = 0;
    size_t end = 0;
    while (end < nodelist.size() && !(depth == 0 && nodelist[end] == ',')) {
        depth += nodelist[end] == '[' ? 1 : nodelist[end] == ']' ? -1 : 0;
        ++end;
    }
    std::string host = nodelist.substr(0, end);
    for (size_t open; (open = host.find('[')) != std::string::npos;) {  // each bracket: its first value
        size_t close = host.find(']', open);
        if (close == std::string::npos)
            throw ConfigError("SLURM_JOB_NODELIST", fmt::format("unbalanced '[' in '{}'", nodelist));
        std::string inside = host.substr(open + 1, close - open - 1);
        host = host.substr(0, open) + inside.substr(0, inside.find_first_of(",-")) + host.substr(close + 1);
    }
    return host;
}

namespace {

// "4", "4(x2)", "4,2(x3)" -> 4: the tasks on the first node (Slurm's per-node task lists).
int slurm_tasks_on_first_node(const char* text) {
    std::string s = text;
    size_t n = 0;
    while (n < s.size() && std::isdigit(static_cast<unsigned char>(s[n]))) ++n;
    return n ? std::stoi(s.substr(0, n)) : 1;
}

#ifdef DUPLEX_HAVE_UCX
// Waits (up to `seconds`) until `ranks` ranks have left the world, cleanly or lost (the store's counters).
void wait_for_ranks_to_leave(Store& store, int64_t ranks, double seconds) {
    auto count = [&](const char* key) {
        auto v = store.try_get(key);
        return v ? store_parse_int(key, *v) : 0;
    };
    Deadline d(seconds);
    while (count("launch/exit") + count(kStoreLostCount) < ranks && !d.expired())
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
}
#endif

}  // namespace

ProcessEnv process_env() {
    ProcessEnv p;
    bool slurm = false;
    if (const char* r = env("DUPLEX_RANK")) {
        p.rank = env_int("DUPLEX_RANK", r);
        const char* w = env("DUPLEX_WORLD_SIZE");
        if (!w) throw ConfigError("DUPLEX_WORLD_SIZE", "must be set together with DUPLEX_RANK");
        p.world_size = env_int("DUPLEX_WORLD_SIZE", w);
        p.source = "DUPLEX_*";
    } else if (const char* r2 = env("RANK"); r2 && env("WORLD_SIZE")) {
        p.rank = env_int("RANK", r2);
        p.world_size = env_int("WORLD_SIZE", env("WORLD_SIZE"));
        p.source = "torchrun (RANK/WORLD_SIZE)";
    } else if (const char* r3 = env("OMPI_COMM_WORLD_RANK")) {
        p.rank = env_int("OMPI_COMM_WORLD_RANK", r3);
        const char* w = env("OMPI_COMM_WORLD_SIZE");
        if (!w) throw ConfigError("OMPI_COMM_WORLD_SIZE", "missing under mpirun");
        p.world_size = env_int("OMPI_COMM_WORLD_SIZE", w);
        p.source = "Open MPI (OMPI_COMM_WORLD_*)";
    } else if (const char* r4 = env("PMI_RANK"); r4 && env("PMI_SIZE")) {
        p.rank = env_int("PMI_RANK", r4);
        p.world_size = env_int("PMI_SIZE", env("PMI_SIZE"));
        p.source = "MPICH / Intel MPI (PMI_RANK/PMI_SIZE)";
    } else if (const char* r5 = env("SLURM_PROCID"); r5 && env("SLURM_NTASKS")) {
        p.rank = env_int("SLURM_PROCID", r5);
        p.world_size = env_int("SLURM_NTASKS", env("SLURM_NTASKS"));
        p.source = "Slurm (SLURM_PROCID/SLURM_NTASKS)";
        slurm = true;
    } else {
        p.source = "single process";
    }
    for (const char* name : {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
        if (const char* l = env(name)) {
            p.local_rank = env_int(name, l);
            break;
        }
    if (const char* l = env("LOCAL_WORLD_SIZE"))
        p.local_size = env_int("LOCAL_WORLD_SIZE", l);
    else if (const char* l2 = env("OMPI_COMM_WORLD_LOCAL_SIZE"))
        p.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", l2);
    else if (const char* l3 = env("MPI_LOCALNRANKS"))
        p.local_size = env_int("MPI_LOCALNRANKS", l3);
    else if (const char* l4 = env("SLURM_STEP_TASKS_PER_NODE"))
        p.local_size = slurm_tasks_on_first_node(l4);
    else if (const char* l5 = env("SLURM_TASKS_PER_NODE"))
        p.local_size = slurm_tasks_on_first_node(l5);
    if (const char* a = env("DUPLEX_STORE_ADDR")) {
        p.store_addr = a;
    } else if (env("MASTER_ADDR") || env("MASTER_PORT")) {
        int port = env("MASTER_PORT") ? env_int("MASTER_PORT", env("MASTER_PORT")) : 29500;
        // NOTE: under torchrun (its agent sets TORCHELASTIC_RUN_ID) the agent's own store already listens on
        // MASTER_PORT: Duplex's rendezvous store takes the next port.
        if (env("TORCHELASTIC_RUN_ID")) ++port;
        std::string host = env("MASTER_ADDR") ? env("MASTER_ADDR") : "127.0.0.1";
        if (!env("MASTER_ADDR") && slurm && (env("SLURM_STEP_NODELIST") || env("SLURM_JOB_NODELIST")))
            host = slurm_first_host(env("SLURM_STEP_NODELIST") ? env("SLURM_STEP_NODELIST") : env("SLURM_JOB_NODELIST"));
        p.store_addr = fmt::format("{}:{}", host, port);
    } else if (slurm && (env("SLURM_STEP_NODELIST") || env("SLURM_JOB_NODELIST"))) {
        // Slurm: the store on the step's first node (where SLURM_PROCID 0 runs), a port derived from the job id
        // so two jobs sharing a node do not meet.
        std::string list = env("SLURM_STEP_NODELIST") ? env("SLURM_STEP_NODELIST") : env("SLURM_JOB_NODELIST");
        int job = env("SLURM_JOB_ID") ? env_int("SLURM_JOB_ID", env("SLURM_JOB_ID")) : 0;
        p.store_addr = fmt::format("{}:{}", slurm_first_host(list), 29500 + job % 1000);
    } else {
        p.store_addr = "127.0.0.1:29500";
    }
    if (p.world_size < 1 || p.rank < 0 || p.rank >= p.world_size)
        throw ConfigError("rank", fmt::format("rank {} of world size {} from {}", p.rank, p.world_size, p.source));
    return p;
}

std::vector<std::string> built_backends() {
    std::vector<std::string> b = {"inproc"};
#ifdef DUPLEX_HAVE_MPI
    b.push_back("mpi");
#endif
#ifdef DUPLEX_HAVE_UCX
    b.push_back("ucx");
#endif
#ifdef DUPLEX_HAVE_NCCL
    b.push_back("nccl");
#endif
    return b;
}

bool backend_built(const std::string& name) {
    for (const std::string& b : built_backends())
        if (b == name) return true;
    return false;
}

bool backend_is_multiprocess(const std::string& name) {
    return name == "mpi" || name == "ucx" || (name == "nccl" && process_env().source != "single process");
}

namespace {

#ifdef DUPLEX_HAVE_MPI
// This process is one rank of an MPI job: the communicator over MPI, fn, a closing barrier; a failure aborts
// the job with its message.
void launch_mpi(const LaunchOptions& o, const RankFn& fn) {
    auto transport = make_mpi_transport();
    try {
        if (o.bind_cores) bind_thread_to_core(transport->rank());
        auto comm = Communicator::create(transport, make_topology(o, *transport), {o.timeout_s});
        fn(comm);
        comm->barrier()->wait();
    } catch (const std::exception& e) {
        log::error("comm", "rank {} failed: {}", transport->rank(), e.what());
        transport->abort(e.what());
    }
}
#endif

#ifdef DUPLEX_HAVE_UCX
// Watchdog of a rank started by a launcher: a rank whose process dies cannot say so; the store server sees its
// connection close. Polls the store on a connection of its own until `done`, and calls `lose` with a message
// naming the lost rank (or rank 0, whose process holds the store), instead of waiting for the timeout.
void watch_for_lost_ranks(const std::string& host, uint16_t port, const ProcessEnv& p, const std::atomic<bool>& done,
                          std::atomic<bool>& store_lost, const std::function<void(const std::string&)>& lose) {
    try {
        TcpStore watch(host, port, kStoreToken.get(), /*connect_timeout_s=*/10, /*request_timeout_s=*/3);
        while (!done.load()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            auto count = watch.try_get(kStoreLostCount);
            if (!count || std::stoll(*count) == 0) continue;
            std::vector<std::string> who;
            for (int r = 0; r < p.world_size; ++r)
                if (auto at = watch.try_get(kStoreLostPrefix + std::to_string(r)))
                    who.push_back(fmt::format("rank {} ({})", r, *at));
            lose(fmt::format("lost {}: the process ended without a clean exit (killed or crashed)",
                             fmt::join(who, ", ")));
            return;
        }
    } catch (const Error& e) {
        // The store lives in rank 0's process: losing it means losing rank 0.
        if (!done.load()) {
            store_lost.store(true);
            lose(fmt::format("lost rank 0 (the store server at {}): {}", p.store_addr, e.what()));
        }
    }
}

// This process is one rank of a job a launcher started (mpirun, torchrun, duplex launch): the rendezvous store
// (served by rank 0), the UCX transport (with NCCL layered over it for nccl), fn under the watchdog, and an
// orderly exit: the store lives until every rank has torn its transport down (or was lost).
void launch_store_processes(const LaunchOptions& o, const RankFn& fn, bool nccl_processes) {
            ProcessEnv p = process_env();
            auto [host, port] = parse_host_port(p.store_addr, "DUPLEX_STORE_ADDR");
            std::unique_ptr<TcpStoreServer> server;
            if (p.rank == 0) server = std::make_unique<TcpStoreServer>(host, port, kStoreToken.get());
            auto store = std::make_shared<TcpStore>(host, port, kStoreToken.get());
            store->set(kStoreRankPrefix + std::to_string(p.rank), std::to_string(p.rank));
            std::exception_ptr failure;
            std::atomic<bool> store_lost{false};
            {
                std::shared_ptr<Transport> transport = make_ucx_transport(store, p.rank, p.world_size);
    #ifdef DUPLEX_HAVE_NCCL
                if (nccl_processes) {
                    int devices = visible_cuda_devices();
                    int device = p.local_rank >= 0 ? p.local_rank : p.rank % std::max(1, devices);
                    transport = layer_nccl(transport, store, device, o.timeout_s);
                }
    #endif
                // Watchdog: a rank whose process dies cannot say so; the store server sees its connection close.
                // Abort this rank's pending communication with a message naming the lost rank, instead of waiting
                // for the timeout. It polls on a connection of its own.
                std::atomic<bool> done{false};
                std::mutex lost_mutex;
                std::string lost;  // set when a rank was lost: why
                // Once a rank is lost this one is done too: abort its communication and, if the transport does not
                // unwind in a few seconds (a communication library blocked on the dead peer), report and exit.
                // The store lives in rank 0's process: before rank 0 leaves over a lost rank, it waits (a few seconds at
                // most) for the others to leave too, so they read who was lost instead of blaming rank 0 for the store.
                auto let_the_others_leave = [&] {
                    if (!server) return;
                    try {
                        wait_for_ranks_to_leave(*store, p.world_size - 1, 3.0);
                    } catch (const Error&) {
                    }
                };
                auto lose = [&](const std::string& why) {
                    {
                        std::lock_guard<std::mutex> lock(lost_mutex);
                        lost = why;
                    }
                    transport->abort(why);
                    Deadline grace(std::min(5.0, o.timeout_s > 0 ? o.timeout_s : 5.0));
                    while (!done.load() && !grace.expired()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
                    if (!done.load()) {
                        log::error("comm", "rank {} failed: {} (exiting: the transport did not unwind)", p.rank, why);
                        std::fflush(nullptr);
                        let_the_others_leave();
                        std::_Exit(2);
                    }
                };
                std::thread watchdog(
            [&] { watch_for_lost_ranks(host, port, p, done, store_lost, lose); });
                try {
                    if (o.bind_cores) bind_thread_to_core(p.rank);
                    auto comm = Communicator::create(transport, make_topology(o, *transport), {o.timeout_s});
                    fn(comm);
                    comm->barrier()->wait();
                    // Whatever still holds the communicator (a framework that keeps it until its interpreter exits)
                    // destroys the transport later, without the store: meet the other ranks now.
                    transport->close();
                } catch (const std::exception& e) {
                    log::error("comm", "rank {} failed: {}", p.rank, e.what());
                    transport->abort(e.what());
                    failure = std::current_exception();
                }
                done.store(true);
                watchdog.join();
                {
                    std::lock_guard<std::mutex> lock(lost_mutex);
                    if (!lost.empty()) {
                        // Tearing UCX down with a dead peer can block or crash inside the library: the job is over,
                        // so report and leave without it.
                        log::error("comm", "rank {}: {}", p.rank, lost);
                        std::fflush(nullptr);
                        let_the_others_leave();
                        std::_Exit(2);
                    }
                }
            }
            // The server lives until every rank has torn its transport down (or was lost).
            if (store_lost.load()) std::rethrow_exception(failure);
            store->set(kStoreExitedPrefix + std::to_string(p.rank), "1");
            store->add("launch/exit", 1);
            if (server) wait_for_ranks_to_leave(*store, p.world_size, 30.0);
            if (failure) std::rethrow_exception(failure);
}
#endif

}  // namespace

std::shared_ptr<Communicator> single_rank_world(double timeout_s) {
    auto fabric = InprocFabric::create(1);
    return Communicator::create(fabric->transport(0), Topology::single_node(1), {timeout_s});
}

void launch(const LaunchOptions& o, const RankFn& fn) {
    if (o.backend == "inproc") return launch_inproc(o, fn);
    if (o.backend != "mpi" && o.backend != "ucx" && o.backend != "nccl")
        throw ConfigError("--backend", fmt::format("unknown backend '{}' (inproc, mpi, ucx, nccl)", o.backend));
    if (!backend_built(o.backend))
        throw ConfigError("--backend", fmt::format("'{}' is not built into this binary (built: {})", o.backend,
                                                   fmt::join(built_backends(), ", ")));
    // nccl: threads of this process unless a launcher started processes, whose control messages then go over UCX.
    bool nccl_processes = o.backend == "nccl" && backend_is_multiprocess("nccl");
#ifdef DUPLEX_HAVE_NCCL
    if (o.backend == "nccl" && !nccl_processes) return launch_nccl_threads(o, fn);
#endif
    if (nccl_processes && !backend_built("ucx"))
        throw ConfigError("--backend", "nccl across processes carries its control messages over UCX, which is not built "
                                       "into this binary");
#ifdef DUPLEX_HAVE_MPI
    if (o.backend == "mpi") return launch_mpi(o, fn);
#endif
#ifdef DUPLEX_HAVE_UCX
    if (o.backend == "ucx" || nccl_processes) return launch_store_processes(o, fn, nccl_processes);
#endif
}

}  // namespace duplex
