// duplex train: training runs. Today the single-rank reference (--ranks 1); the distributed executor
// (--pp/--dp/--ep and schedules) arrives with the runtime issue.
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "runtime/trainer.hpp"
#include "tools/commands.hpp"

namespace duplex::tools {

namespace {

struct Args {
    TrainOptions train;
    int ranks = 1;
    int log_every = 10;
    std::string json;
    bool fp64 = false;
    bool no_bias_update = false;
};

template <typename T>
int run_typed(const Args& a) {
    TrainOptions o = a.train;
    o.bias_update = !a.no_bias_update;
    ReferenceTrainer<T> trainer(o);
    const ModelConfig& c = trainer.model().config();
    fmt::print("# duplex train: model {} ({} parameters, {} layers, {} routed experts top-{}), 1 rank, {}\n", c.name,
               c.num_parameters(), c.layers, c.experts, c.top_k, a.fp64 ? "fp64" : "fp32");
    fmt::print("# {} steps x {} microbatches x {} sequences x {} tokens; lr {}; recompute {}; bias update {}\n", o.steps,
               o.microbatches, o.sequences_per_microbatch, c.seq_len, o.lr, o.recompute ? "on" : "off",
               o.bias_update ? "on" : "off");
    nlohmann::json steps = nlohmann::json::array();
    double first_loss = 0;
    auto metrics = trainer.run([&](const StepMetrics& m) {
        if (m.step == 1) first_loss = m.loss;
        steps.push_back({{"step", m.step},
                         {"loss", m.loss},
                         {"aux_loss", m.aux_loss},
                         {"max_vio", m.max_vio},
                         {"grad_norm", m.grad_norm},
                         {"step_time_s", m.step_time_s},
                         {"tokens_per_s", m.tokens_per_s}});
        if (m.step == 1 || m.step % a.log_every == 0 || m.step == o.steps)
            fmt::print("step {:>5}  loss {:8.4f}  tokens/s {:9.0f}  MaxVio {:6.3f}  |g| {:7.3f}\n", m.step, m.loss,
                       m.tokens_per_s, m.max_vio, m.grad_norm);
        std::fflush(stdout);
    });
    double last = metrics.back().loss;
    fmt::print("# loss {:.4f} -> {:.4f} ({:.1f}% of the initial); peak activation bytes {}\n", first_loss, last,
               100.0 * last / first_loss, trainer.model().ledger().peak("activations"));
    if (!a.json.empty()) {
        nlohmann::json j = {{"model", c.name},
                            {"ranks", 1},
                            {"dtype", a.fp64 ? "fp64" : "fp32"},
                            {"recompute", o.recompute},
                            {"peak_activation_bytes", trainer.model().ledger().peak("activations")},
                            {"steps", steps}};
        std::ofstream out(a.json);
        if (!out) throw ConfigError("--json", fmt::format("cannot write '{}'", a.json));
        out << j.dump(1) << "\n";
        fmt::print("# metrics written to {}\n", a.json);
    }
    return 0;
}

}  // namespace

Command add_train(CLI::App& app) {
    auto a = std::make_shared<Args>();
    auto* cmd = app.add_subcommand("train",
                                   "Train the built-in DeepSeek-V3-style MoE model on the synthetic task.\n"
                                   "Example: duplex train --ranks 1 --model tiny --steps 300 --json metrics.json");
    cmd->add_option("--ranks", a->ranks, "ranks (1: the single-rank reference)")->capture_default_str();
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
    cmd->add_option("--balance-alpha", a->train.balance_alpha, "weight of the sequence-wise balance loss (0: off)")
        ->capture_default_str();
    cmd->add_flag("--no-bias-update", a->no_bias_update, "freeze the aux-loss-free routing bias");
    cmd->add_flag("--fp64", a->fp64, "train in double precision");
    cmd->add_option("--log-every", a->log_every, "print a progress line every N steps")->capture_default_str();
    cmd->add_option("--json", a->json, "write per-step metrics (loss, max_vio, ...) to this file");
    return [a] {
        if (a->ranks != 1)
            throw ConfigError("--ranks", fmt::format("only the single-rank reference (--ranks 1) is available yet, got {}",
                                                     a->ranks));
        return a->fp64 ? run_typed<double>(*a) : run_typed<float>(*a);
    };
}

}  // namespace duplex::tools
