// Trains the MLP of mlp_stage.hpp (8 tanh layers, regression) under DualPipe over 4 pipeline stages x 2
// data-parallel replicas with ZeRO-1 AdamW, on 8 in-process ranks, then the same steps on a single rank with the
// same global batch, and checks that both end with the same losses and weights (fp64: 1e-12 relative).
//   custom_stage [--schedule dualpipe|dualpipev|1f1b|zb1p] [--steps N]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include <duplex/comm/launch.hpp>
#include <duplex/parallel/plan.hpp>
#include <duplex/runtime/train/fit.hpp>
#include <duplex/runtime/train/pipeline_trainer.hpp>
#include <duplex/runtime/train/reference.hpp>

#include "mlp_stage.hpp"

using namespace duplex;

struct Result {
    std::vector<double> losses;
    std::map<std::string, std::vector<double>> params;
};

Result train(sched::ScheduleKind kind, int pp, int dp, int microbatches, int steps, const mlp::Config& mc) {
    PipelineOptions p;
    p.schedule = kind, p.pp = pp, p.dp = dp, p.layers = mc.layers;
    TrainOptions o;
    o.microbatches = microbatches, o.lr = 1e-2, o.clip = 1.0;
    StageFactory factory = [mc](const StageInfo& info) { return std::make_unique<mlp::MlpStage>(mc, info); };
    LaunchOptions l;  // in-process ranks (threads): the embedded default
    l.ranks = pipeline_ranks(kind, pp) * dp;
    Result r;
    std::mutex m;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> trainer(world, p, o, factory);
        std::vector<double> losses;
        FitOptions f;
        f.steps = steps;
        fit(trainer, f, {.on_step = [&](const StepMetrics& sm) {
                             losses.push_back(sm.loss);
                             if (world->rank() == 0 && l.ranks > 1)
                                 std::printf("step %2d  loss %.6f  bubble %4.1f%%\n", sm.step, sm.loss,
                                             100 * sm.bubble_fraction);
                         }});
        auto owned = trainer.owned_parameters();
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) r.losses = losses;
        r.params.insert(owned.begin(), owned.end());
    });
    return r;
}

int main(int argc, char** argv) {
    std::string schedule = "dualpipe";
    int steps = 10;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--schedule")) schedule = argv[i + 1];
        else if (!std::strcmp(argv[i], "--steps")) steps = std::atoi(argv[i + 1]);
    }
    try {
        mlp::Config mc;
        const int pp = 4, dp = 2, n = 8;
        auto kind = sched::kind_from_name(schedule);
        std::printf("# custom MLP stage: %s PP=%d x DP=%d, ZeRO-1 AdamW, %d microbatches per replica, fp64\n",
                    schedule.c_str(), pp, dp, n);
        Result dist = train(kind, pp, dp, n, steps, mc);
        Result single = train(sched::ScheduleKind::OneFOneB, 1, 1, n * dp, steps, mc);
        double worst_loss = 0;
        for (int s = 0; s < steps; ++s)
            worst_loss = std::max(worst_loss, std::fabs(dist.losses[s] - single.losses[s]) / std::fabs(single.losses[s]));
        ParamDiff d = compare_parameters(dist.params, single.params);
        bool ok = worst_loss <= 1e-12 && d.worst <= 1e-12;
        std::printf("# loss %.6f -> %.6f; against the single-rank run: max loss rel diff %.3g, max parameter rel diff "
                    "%.3g -> %s\n",
                    dist.losses.front(), dist.losses.back(), worst_loss, d.worst, ok ? "EQUAL" : "MISMATCH");
        return ok ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "custom_stage: %s\n", e.what());
        return 2;
    }
}
