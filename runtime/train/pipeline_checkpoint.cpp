// PipelineTrainer's checkpoints: the layout a checkpoint records, the save (every rank its shard, rank 0 the
// manifest last, the oldest removed beyond `keep`) and the load (verified everywhere before any state changes).
#include "runtime/train/pipeline_trainer.hpp"

#include "runtime/train/pipeline_impl.hpp"

namespace duplex {

namespace {

const Knob<long> kCrashBeforeManifest("DUPLEX_TEST_CRASH_BEFORE_MANIFEST", 0,
                                      "tests only: rank 0 kills its process (SIGKILL) while saving the checkpoint of "
                                      "this step, after every shard is written and before the manifest (0: never)");

bool crash_before_manifest(long step) { return kCrashBeforeManifest.get() == step; }

}  // namespace

template <typename T>
std::string PipelineTrainer<T>::layout_json() const {
    const Impl& I = *impl_;
    nlohmann::json j = {{"trainer", "pipeline"},
                        {"schedule", std::string(sched::kind_name(I.p.schedule))},
                        {"pp", I.p.pp},
                        {"dp", I.p.dp},
                        {"ep", I.p.ep},
                        {"dtype", std::string(dtype_name(dtype_of<T>()))},
                        {"optimizer", I.p.optimizer},
                        {"global_microbatches", I.o.microbatches * I.p.dp},
                        {"ema", I.p.ema_decay > 0}};
    if (I.p.vpp != 1) j["vpp"] = I.p.vpp;  // the stages each rank holds (absent: one, as before interleaving)
    if (I.custom) {
        j["model"] = "custom";
        j["layers"] = I.p.layers;
    } else {
        ModelConfig c = I.o.model_config();
        j["model"] = c.name;
        j["model_shape"] = fmt::format("layers {} dense {} hidden {} vocab {} experts {} top-{} seq {}", c.layers,
                                       c.dense_layers, c.hidden, c.vocab, c.experts, c.top_k, c.seq_len);
        j["sequences_per_microbatch"] = I.o.sequences_per_microbatch;
        j["seed"] = std::to_string(I.o.seed);
        j["data"] = I.o.data;
        // The data cursor: batches are a function of (step, global microbatch), so the step is the cursor.
        j["data_cursor"] = "step";
    }
    return j.dump();
}

template <typename T>
std::string PipelineTrainer<T>::save_checkpoint(const std::string& root, int keep) {
    Impl& I = *impl_;
    DUPLEX_CHECK_ARG(!I.p.emulate, "--save", "emulate mode trains no weights: nothing to checkpoint");
    std::string dir = ckpt::step_directory(root, I.step_);
    if (I.world->rank() == 0) {
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);  // an interrupted save of the same step
        std::filesystem::create_directories(dir, ec);
        if (ec) throw CheckpointError(fmt::format("{}: cannot create: {}", dir, ec.message()));
    }
    I.world->barrier()->wait();
    ckpt::ShardWriter w;
    const DType dt = dtype_of<T>();
    // Each value is written once: by the owner copy (DualPipe holds two) in the first DP replica, or for a routed
    // expert's in the first EP group (the others hold the same experts' copies).
    auto writer = [&](bool expert) { return expert ? I.grid.ep_group == 0 : I.grid.dp_index == 0; };
    for (auto& [s, stage] : I.stages) {
        if (!I.owner.at(s)) continue;
        for (StateBuffer& b : stage->state())
            if (writer(b.expert))
                w.add("value/" + b.name, b.value.dtype(), b.value.numel(), 0, b.value.numel(), b.value.raw());
        for (size_t k = 0; k < I.optimizers[s].size(); ++k) {
            Zero1AdamW<T>& opt = *I.optimizers[s][k];
            I.for_each_shard_piece(s, k, [&](const std::string& name, int64_t n, int64_t first, int64_t count, size_t at) {
                w.add("adam_m/" + name, dt, n, first, count, opt.first_moment().data() + at);
                w.add("adam_v/" + name, dt, n, first, count, opt.second_moment().data() + at);
            });
        }
    }
    if (I.ema) {
        const auto& shadow = I.ema->shadow();  // waits for the pending update
        for (size_t i = 0; i < I.ema_params.size(); ++i)
            if (writer(I.ema_expert[i]))
                w.add("ema/" + I.ema_params[i].first, dt, int64_t(shadow[i].size()), 0, int64_t(shadow[i].size()),
                      shadow[i].data());
    }
    ckpt::FileEntry mine = w.write(dir, fmt::format("rank-{:05d}.bin", I.world->rank()));
    std::vector<std::string> entries = gather_strings(*I.world, ckpt::ShardWriter::encode(mine));
    if (I.world->rank() == 0) {
        std::vector<ckpt::FileEntry> files;
        for (const std::string& e : entries) files.push_back(ckpt::ShardWriter::decode(e));
        if (crash_before_manifest(I.step_)) std::raise(SIGKILL);
        ckpt::write_manifest(dir, I.step_, layout_json(), files);
        ckpt::prune_checkpoints(root, keep);
    }
    I.world->barrier()->wait();  // nobody goes on (or exits) before the checkpoint is complete
    return dir;
}

template <typename T>
long PipelineTrainer<T>::load_checkpoint(const std::string& path) {
    Impl& I = *impl_;
    DUPLEX_CHECK_ARG(!I.p.emulate, "--resume", "emulate mode trains no weights: nothing to resume");
    // Phase 1: read and verify everything into staging buffers; nothing of the run changes yet.
    struct Copy {
        void* dst;
        std::vector<char> bytes;
    };
    std::vector<Copy> copies;
    std::map<Zero1AdamW<T>*, std::pair<std::vector<T>, std::vector<T>>> moments;
    std::vector<std::vector<T>> ema_values;
    long step = 0;
    std::string error;
    try {
        std::optional<std::string> dir = ckpt::latest_checkpoint(path);
        if (!dir)
            throw CheckpointError(fmt::format("{}: no complete checkpoint (no manifest.json there or in a step-* "
                                              "directory under it)", path));
        ckpt::CheckpointReader r(*dir);
        nlohmann::json have = nlohmann::json::parse(r.layout_json()), want = nlohmann::json::parse(layout_json());
        // The most telling difference first.
        std::vector<std::string> keys = {"trainer", "model", "model_shape", "dtype", "pp", "schedule", "ep",
                                         "global_microbatches"};
        for (auto& [key, value] : want.items())
            if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.push_back(key);
        for (const std::string& key : keys) {
            // DP may change (ZeRO-1 re-shards); an EMA may start now.
            if (key == "dp" || key == "ema" || !want.contains(key)) continue;
            const nlohmann::json& value = want[key];
            if (!have.contains(key) || have[key] != value)
                throw CheckpointError(fmt::format("{}/manifest.json: written by a run with {} = {}, this run has {} "
                                                  "(only the DP size may change on resume)",
                                                  *dir, key, have.contains(key) ? have[key].dump() : "nothing",
                                                  value.dump()));
        }
        const DType dt = dtype_of<T>();
        for (auto& [s, stage] : I.stages) {
            for (StateBuffer& b : stage->state()) {
                Copy c{b.value.raw(), std::vector<char>(b.value.nbytes())};
                r.read("value/" + b.name, b.value.dtype(), b.value.numel(), 0, b.value.numel(), c.bytes.data());
                copies.push_back(std::move(c));
            }
            for (size_t k = 0; k < I.optimizers[s].size(); ++k) {
                Zero1AdamW<T>& opt = *I.optimizers[s][k];
                auto& [m, v] = moments[&opt];
                m.assign(opt.shard_size(), T(0));
                v.assign(opt.shard_size(), T(0));
                I.for_each_shard_piece(s, k, [&](const std::string& name, int64_t n, int64_t first, int64_t count,
                                                 size_t at) {
                    r.read("adam_m/" + name, dt, n, first, count, m.data() + at);
                    r.read("adam_v/" + name, dt, n, first, count, v.data() + at);
                });
            }
        }
        if (I.ema) {
            for (auto& [name, view] : I.ema_params) {
                if (!r.has("ema/" + name)) {  // saved without an EMA: it starts from the loaded weights
                    ema_values.clear();
                    break;
                }
                ema_values.emplace_back(size_t(view.numel()));
                r.read("ema/" + name, dt, view.numel(), 0, view.numel(), ema_values.back().data());
            }
        }
        step = r.step();
    } catch (const Error& e) {
        error = e.what();
    }
    // Phase 2: every rank agrees before anything changes; a refusal is raised on every rank with the first
    // refusing rank's reason (each rank verifies only the files it reads).
    constexpr size_t kReason = 1024;
    std::vector<char> reasons(kReason * size_t(I.world->size()), 0), mine(kReason, 0);
    std::memcpy(mine.data(), error.data(), std::min(error.size(), kReason - 1));
    I.world->all_gather(mine.data(), reasons.data(), kReason)->wait();
    if (!error.empty()) throw CheckpointError(error);
    for (int rr = 0; rr < I.world->size(); ++rr)
        if (reasons[size_t(rr) * kReason])
            throw CheckpointError(fmt::format("rank {}: {} (nothing was loaded)", rr, reasons.data() + size_t(rr) * kReason));
    // Phase 3: apply.
    for (Copy& c : copies) std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
    for (auto& [opt, mv] : moments) {
        opt->first_moment() = std::move(mv.first);
        opt->second_moment() = std::move(mv.second);
    }
    if (I.ema) {
        std::vector<const T*> values;
        if (ema_values.empty())
            for (auto& [name, view] : I.ema_params) values.push_back(view.template data<T>());
        else
            for (auto& v : ema_values) values.push_back(v.data());
        I.ema->initialize(values);
    }
    I.step_ = int(step);
    return step;
}

#define DUPLEX_CHECKPOINT_MEMBERS(T)                                                             \
    template std::string PipelineTrainer<T>::layout_json() const;                              \
    template std::string PipelineTrainer<T>::save_checkpoint(const std::string&, int);         \
    template long PipelineTrainer<T>::load_checkpoint(const std::string&);
DUPLEX_CHECKPOINT_MEMBERS(float)
DUPLEX_CHECKPOINT_MEMBERS(double)
#undef DUPLEX_CHECKPOINT_MEMBERS

}  // namespace duplex
