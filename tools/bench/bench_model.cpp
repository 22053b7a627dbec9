// duplex_bench_model: forward+backward throughput of the reference model on one core, next to OpenBLAS sgemm
// on exactly the GEMM shapes the model issued, and the activation memory saved by recompute.
//   duplex_bench_model [--model small] [--steps 5] [--json FILE]
#include <cmath>
#include <fstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/clock.hpp"
#include "kernels/cpu/ops.hpp"
#include "runtime/train/data.hpp"
#include "runtime/model/stage.hpp"

using namespace duplex;

namespace {

double gemm_flops(const std::vector<kernels::GemmShape>& shapes) {
    double f = 0;
    for (auto& s : shapes) f += 2.0 * s.M * s.N * s.K;
    return f;
}

// Causal attention: QK^T and PV over S(S+1)/2 pairs forward; four such products in backward.
double attention_flops(const ModelConfig& c, int sequences) {
    double pairs = double(c.seq_len) * (c.seq_len + 1) / 2;
    double fwd = 2 * 2.0 * sequences * c.heads * c.head_dim * pairs;
    return c.layers * (fwd + 2 * fwd);
}

struct Run {
    double seconds = 0, flops = 0, gemm_flops = 0;
    int64_t peak_activations = 0;
    std::vector<kernels::GemmShape> shapes;
};

Run run_model(const ModelConfig& c, int microbatches, int sequences, int steps, bool recompute) {
    ModelStage<float> stage(c, 0, c.layers, true, true, 1);
    stage.set_recompute(recompute);
    SyntheticTask task(c.vocab, c.seq_len, 1);
    std::vector<Batch> batches;
    for (int mb = 0; mb < microbatches; ++mb) batches.push_back(task.batch(sequences, 100 + mb));
    auto one_step = [&] {
        for (int mb = 0; mb < microbatches; ++mb) {
            stage.forward(mb, batches[mb], {});
            stage.backward(mb, {});
        }
    };
    one_step();  // warm-up
    Run r;
    kernels::gemm_record(&r.shapes);
    one_step();
    kernels::gemm_record(nullptr);
    Stopwatch sw;
    for (int s = 0; s < steps; ++s) one_step();
    r.seconds = sw.seconds() / steps;
    r.gemm_flops = gemm_flops(r.shapes);
    r.flops = r.gemm_flops + microbatches * attention_flops(c, sequences);
    r.peak_activations = stage.ledger().peak("activations");
    return r;
}

double sgemm_seconds(const std::vector<kernels::GemmShape>& shapes, int reps) {
    size_t biggest = 0;
    for (auto& s : shapes)
        biggest = std::max({biggest, size_t(s.M) * s.K, size_t(s.K) * s.N, size_t(s.M) * s.N});
    std::vector<float> a(biggest, 0.5f), b(biggest, 0.25f), c(biggest, 0.0f);
    Stopwatch sw;
    for (int r = 0; r < reps; ++r)
        for (auto& s : shapes) kernels::gemm<float>(s.ta, s.tb, s.M, s.N, s.K, 1.0f, a.data(), b.data(), 0.0f, c.data());
    return sw.seconds() / reps;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"Forward+backward GFLOP/s of the reference model vs OpenBLAS sgemm on the same shapes (one core)"};
    std::string model = "small", json;
    int steps = 5, microbatches = 2, sequences = 4;
    app.add_option("--model", model, "tiny or small")->capture_default_str();
    app.add_option("--steps", steps, "timed steps")->capture_default_str();
    app.add_option("--microbatches", microbatches, "microbatches per step")->capture_default_str();
    app.add_option("--mb-sequences", sequences, "sequences per microbatch")->capture_default_str();
    app.add_option("--json", json, "write the results as JSON");
    CLI11_PARSE(app, argc, argv);
    kernels::blas_single_threaded();
    ModelConfig c = ModelConfig::preset(model);
    Run plain = run_model(c, microbatches, sequences, steps, false);
    Run rec = run_model(c, microbatches, sequences, steps, true);
    double blas_s = sgemm_seconds(plain.shapes, steps);
    double model_gflops = plain.flops / plain.seconds / 1e9;
    double blas_gflops = plain.gemm_flops / blas_s / 1e9;
    fmt::print("# model {} ({} parameters), {} microbatches x {} sequences x {} tokens, 1 core\n", c.name,
               c.num_parameters(), microbatches, sequences, c.seq_len);
    fmt::print("forward+backward      : {:.3f} s/step, {:.2f} GFLOP/step ({:.0f}% in GEMMs) -> {:.2f} GFLOP/s\n",
               plain.seconds, plain.flops / 1e9, 100 * plain.gemm_flops / plain.flops, model_gflops);
    fmt::print("OpenBLAS sgemm, same {} GEMM shapes: {:.3f} s -> {:.2f} GFLOP/s\n", plain.shapes.size(), blas_s,
               blas_gflops);
    fmt::print("ratio model / sgemm   : {:.2f}\n", model_gflops / blas_gflops);
    fmt::print("recompute             : peak activation bytes {} -> {} ({:.0f}% less), step time {:.3f} -> {:.3f} s\n",
               plain.peak_activations, rec.peak_activations,
               100.0 * (1 - double(rec.peak_activations) / double(plain.peak_activations)), plain.seconds, rec.seconds);
    if (!json.empty()) {
        nlohmann::json j = {{"model", c.name},
                            {"step_seconds", plain.seconds},
                            {"gflop_per_step", plain.flops / 1e9},
                            {"model_gflops", model_gflops},
                            {"sgemm_gflops_same_shapes", blas_gflops},
                            {"ratio", model_gflops / blas_gflops},
                            {"peak_activation_bytes", plain.peak_activations},
                            {"peak_activation_bytes_recompute", rec.peak_activations},
                            {"recompute_step_seconds", rec.seconds}};
        std::ofstream(json) << j.dump(2) << "\n";
    }
    return 0;
}
