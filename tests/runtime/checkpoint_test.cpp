// Checkpoints: a resumed run equals the uninterrupted one bit for bit (every schedule, EP = 2, the EMA on,
// fp32 and fp64); a resume with another DP size re-shards ZeRO-1 and equals the uninterrupted run to 1e-12 in
// fp64; a damaged checkpoint is refused naming the file, before anything changes.
#include "runtime/train/checkpoint.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <mutex>

#include <gtest/gtest.h>

#include "tests/runtime/temp_dir.hpp"

#include "comm/launch.hpp"
#include "runtime/train/fit.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/train/reference.hpp"

namespace duplex {
namespace {

namespace fs = std::filesystem;
using sched::ScheduleKind;

struct TempDir : testing_support::TempDir {
    TempDir() : testing_support::TempDir("duplex-ckpt") {}
};

struct Layout {
    ScheduleKind kind;
    int pp, dp, ep, microbatches;
};

TrainOptions options(int microbatches) {
    TrainOptions o;
    o.model = "tiny";
    o.microbatches = microbatches;
    o.sequences_per_microbatch = 2;
    o.seed = 11;
    return o;
}

// Runs `steps` steps of the layout (resuming from `resume` when given) and saves into `save`; returns every
// owned parameter and EMA value, by name (collected over the ranks).
template <typename T>
std::map<std::string, std::vector<T>> train(const Layout& l, int steps, const std::string& resume,
                                            const std::string& save, long* resumed_after = nullptr) {
    PipelineOptions p{l.kind, l.pp, l.dp, l.ep};
    p.ema_decay = 0.9;
    TrainOptions o = options(l.microbatches);
    std::mutex m;
    std::map<std::string, std::vector<T>> out;
    LaunchOptions lo;
    lo.ranks = pipeline_ranks(l.kind, l.pp) * l.dp;
    lo.timeout_s = 60;
    launch(lo, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<T> t(world, p, o);
        long after = resume.empty() ? 0 : t.load_checkpoint(resume);
        while (t.steps_done() < steps) t.step();
        if (!save.empty()) t.save_checkpoint(save);
        auto params = t.owned_parameters();
        auto ema = t.ema_parameters();
        std::lock_guard<std::mutex> lock(m);
        if (resumed_after) *resumed_after = after;
        for (auto& [name, v] : params) out["value/" + name] = v;
        for (auto& [name, v] : ema) out["ema/" + name] = v;
    });
    return out;
}

std::map<std::string, std::pair<uint64_t, uint64_t>> checksums(const std::string& dir) {
    ckpt::CheckpointReader r(dir);
    std::map<std::string, std::pair<uint64_t, uint64_t>> out;
    for (const auto& f : r.files()) out[f.file] = {f.bytes, f.checksum};
    return out;
}

class ResumeEqualsUninterrupted : public ::testing::TestWithParam<ScheduleKind> {};

template <typename T>
void check_bitwise(ScheduleKind kind) {
    Layout l{kind, 2, 2, 2, 4};
    TempDir d;
    train<T>(l, 6, "", d / "whole");
    train<T>(l, 3, "", d / "split");
    long after = 0;
    train<T>(l, 6, d / "split", d / "split", &after);
    EXPECT_EQ(after, 3);
    auto whole = checksums(ckpt::step_directory(d / "whole", 6));
    auto split = checksums(ckpt::step_directory(d / "split", 6));
    EXPECT_EQ(whole, split) << "the resumed run's shards differ from the uninterrupted run's";
    EXPECT_EQ(whole.size(), size_t(pipeline_ranks(kind, 2) * 2));
    // The shards hold moments: a run that forgot them (or the EMA) on resume would not get here, but check that
    // the files do carry them.
    ckpt::CheckpointReader r(ckpt::step_directory(d / "split", 6));
    int moments = 0, emas = 0;
    for (const auto& f : r.files())
        for (const auto& rec : f.records) moments += rec.name.rfind("adam_m/", 0) == 0, emas += rec.name.rfind("ema/", 0) == 0;
    EXPECT_GT(moments, 0);
    EXPECT_GT(emas, 0);
}

TEST_P(ResumeEqualsUninterrupted, Fp32Bitwise) { check_bitwise<float>(GetParam()); }
TEST_P(ResumeEqualsUninterrupted, Fp64Bitwise) { check_bitwise<double>(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Schedules, ResumeEqualsUninterrupted,
                         ::testing::Values(ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe,
                                           ScheduleKind::DualPipeV),
                         [](const auto& info) { return std::string(sched::kind_name(info.param)); });

TEST(Checkpoint, ResumeWithAnotherDpSizeReshards) {
    for (ScheduleKind kind : {ScheduleKind::OneFOneB, ScheduleKind::DualPipe}) {
        TempDir d;
        // The same global batch: DP 2 x 4 microbatches, then DP 1 x 8.
        auto whole = train<double>({kind, 2, 1, 1, 8}, 6, "", "");
        train<double>({kind, 2, 2, 1, 4}, 3, "", d / "dp2");
        auto resumed = train<double>({kind, 2, 1, 1, 8}, 6, d / "dp2", "");
        ASSERT_EQ(whole.size(), resumed.size());
        ParamDiff diff = compare_parameters(resumed, whole);
        EXPECT_TRUE(diff.missing.empty());
        EXPECT_LE(diff.worst, 1e-12) << sched::kind_name(kind) << ": " << diff.worst_name;
        // And the other way: DP 1 -> 2 (each rank now takes half of the saved shard).
        train<double>({kind, 2, 1, 1, 8}, 3, "", d / "dp1");
        auto wider = train<double>({kind, 2, 2, 1, 4}, 6, d / "dp1", "");
        auto whole2 = train<double>({kind, 2, 2, 1, 4}, 6, "", "");
        diff = compare_parameters(wider, whole2);
        EXPECT_LE(diff.worst, 1e-12) << sched::kind_name(kind) << ": " << diff.worst_name;
    }
}

// A resume from a damaged checkpoint: refused on every rank with the file named, and the run's state untouched.
std::string refusal(const std::string& dir, const Layout& l) {
    PipelineOptions p{l.kind, l.pp, l.dp, l.ep};
    p.ema_decay = 0.9;
    TrainOptions o = options(l.microbatches);
    std::mutex m;
    std::string what;
    int unchanged = 0;
    LaunchOptions lo;
    lo.ranks = pipeline_ranks(l.kind, l.pp) * l.dp;
    lo.timeout_s = 60;
    launch(lo, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<float> t(world, p, o);
        auto before = t.owned_parameters();
        std::string mine;
        try {
            t.load_checkpoint(dir);
        } catch (const CheckpointError& e) {
            mine = e.what();
        }
        bool same = t.owned_parameters() == before && t.steps_done() == 0;
        std::lock_guard<std::mutex> lock(m);
        unchanged += same;
        if (world->rank() == 0) what = mine;
        EXPECT_FALSE(mine.empty()) << "rank " << world->rank() << " loaded a damaged checkpoint";
    });
    EXPECT_EQ(unchanged, lo.ranks) << "a refused checkpoint changed a rank's parameters";
    return what;
}

TEST(Checkpoint, DamageIsRefusedNamingTheFile) {
    Layout l{ScheduleKind::OneFOneB, 2, 2, 2, 4};
    TempDir d;
    train<float>(l, 2, "", d / "ok");
    std::string dir = ckpt::step_directory(d / "ok", 2);
    auto copy = [&](const std::string& name) {
        fs::copy(dir, d / name, fs::copy_options::recursive);
        return d / name;
    };
    {  // a truncated shard
        std::string c = copy("truncated");
        fs::resize_file(c + "/rank-00001.bin", fs::file_size(c + "/rank-00001.bin") - 7);
        std::string e = refusal(c, l);
        EXPECT_NE(e.find("rank-00001.bin"), std::string::npos) << e;
        EXPECT_NE(e.find("truncated"), std::string::npos) << e;
    }
    {  // one flipped byte in the middle
        std::string c = copy("flipped");
        std::fstream f(c + "/rank-00002.bin", std::ios::in | std::ios::out | std::ios::binary);
        f.seekg(std::streamoff(fs::file_size(c + "/rank-00002.bin") / 2));
        char byte = 0;
        f.read(&byte, 1);
        byte ^= 0x10;
        f.seekp(std::streamoff(fs::file_size(c + "/rank-00002.bin") / 2));
        f.write(&byte, 1);
        f.close();
        std::string e = refusal(c, l);
        EXPECT_NE(e.find("rank-00002.bin"), std::string::npos) << e;
        EXPECT_NE(e.find("checksum"), std::string::npos) << e;
    }
    {  // a manifest of another layout (PP = 4 where this run has 2)
        Layout other{ScheduleKind::OneFOneB, 4, 2, 2, 4};
        std::string e = refusal(dir, other);
        EXPECT_NE(e.find("manifest.json"), std::string::npos) << e;
        EXPECT_NE(e.find("pp"), std::string::npos) << e;
    }
    {  // an interrupted save: no manifest
        std::string c = copy("interrupted");
        fs::remove(c + "/manifest.json");
        std::string e = refusal(c, l);
        EXPECT_NE(e.find("no complete checkpoint"), std::string::npos) << e;
    }
}

TEST(Checkpoint, TheNewestCompleteOneIsLoadedAndOldOnesPruned) {
    TempDir d;
    std::string root = d / "run";
    for (long step : {1, 2, 3, 4}) {
        fs::create_directories(ckpt::step_directory(root, step));
        ckpt::ShardWriter w;
        double x = double(step);
        w.add("x", DType::F64, 1, 0, 1, &x);
        ckpt::write_manifest(ckpt::step_directory(root, step), step, "{}", {w.write(ckpt::step_directory(root, step), "r.bin")});
    }
    fs::create_directories(ckpt::step_directory(root, 5));  // an interrupted save of step 5
    EXPECT_EQ(ckpt::latest_checkpoint(root), ckpt::step_directory(root, 4));
    ckpt::prune_checkpoints(root, 2);
    EXPECT_FALSE(fs::exists(ckpt::step_directory(root, 1)));
    EXPECT_FALSE(fs::exists(ckpt::step_directory(root, 2)));
    EXPECT_TRUE(fs::exists(ckpt::step_directory(root, 3)));
    EXPECT_TRUE(fs::exists(ckpt::step_directory(root, 5)));  // newer than every complete one: may still be written
    ckpt::CheckpointReader r(*ckpt::latest_checkpoint(root));
    double x = 0;
    r.read("x", DType::F64, 1, 0, 1, &x);
    EXPECT_EQ(x, 4.0);
}

TEST(Checkpoint, PiecesFromSeveralFilesAssembleAnyRange) {
    TempDir d;
    std::vector<float> v(10);
    for (int i = 0; i < 10; ++i) v[size_t(i)] = float(i) * 1.5f;
    std::vector<ckpt::FileEntry> files;
    for (int part = 0; part < 3; ++part) {  // shards of 4, 4 and 2 elements, as ZeRO-1 over 3 ranks
        ckpt::ShardWriter w;
        int begin = part * 4, count = std::min(4, 10 - begin);
        w.add("m", DType::F32, 10, begin, count, v.data() + begin);
        files.push_back(w.write(d.path.string(), fmt::format("r{}.bin", part)));
    }
    ckpt::write_manifest(d.path.string(), 7, R"({"dp": 3})", files);
    ckpt::CheckpointReader r(d.path.string());
    EXPECT_EQ(r.step(), 7);
    EXPECT_EQ(r.layout_field("dp"), "3");
    for (auto [b, n] : std::vector<std::pair<int, int>>{{0, 10}, {3, 5}, {5, 5}, {9, 1}}) {  // DP 2 shards and more
        std::vector<float> got(static_cast<size_t>(n), 0.0f);
        r.read("m", DType::F32, 10, b, n, got.data());
        EXPECT_EQ(got, std::vector<float>(v.begin() + b, v.begin() + b + n)) << b << "+" << n;
    }
    std::vector<double> wrong(2);
    EXPECT_THROW(r.read("m", DType::F64, 10, 0, 2, wrong.data()), CheckpointError);   // another dtype
    EXPECT_THROW(r.read("m", DType::F32, 12, 0, 2, wrong.data()), CheckpointError);   // another size
    EXPECT_THROW(r.read("nope", DType::F32, 10, 0, 2, wrong.data()), CheckpointError);
}

// The training loop: steps to the target, a checkpoint every N steps and at the end with only the newest K kept,
// the callbacks in order, and a resume that continues where the last checkpoint stopped, bit for bit.
namespace fit_test {

struct Seen {
    std::vector<long> before, after;
    std::vector<double> losses;
    long resumed = -1;
    FitResult r;
};

Seen run_fit(const FitOptions& f) {
    PipelineOptions p{ScheduleKind::OneFOneB, 2, 1, 1};
    TrainOptions o = options(4);
    Seen seen;
    std::mutex m;
    launch({.ranks = 2}, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> t(world, p, o);
        Seen mine;
        FitCallbacks cb;
        cb.on_resume = [&](long step, double) { mine.resumed = step; };
        cb.before_step = [&](long step) { mine.before.push_back(step); };
        cb.on_step = [&](const StepMetrics& s) {
            mine.after.push_back(s.step);
            mine.losses.push_back(s.loss);
        };
        mine.r = fit(t, f, cb);
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) seen = mine;
    });
    return seen;
}

TEST(Fit, SavesEveryNKeepsTheNewestKAndResumesWhereItStopped) {
    TempDir dir;
    FitOptions f;
    f.steps = 5, f.save = dir / "run", f.save_every = 2, f.keep = 2;
    Seen first = run_fit(f);
    EXPECT_EQ(first.before, (std::vector<long>{1, 2, 3, 4, 5}));
    EXPECT_EQ(first.after, (std::vector<long>{1, 2, 3, 4, 5}));
    EXPECT_EQ(first.r.start, 0);
    EXPECT_EQ(first.r.steps_done, 5);
    EXPECT_EQ(first.r.first_loss, first.losses.front());
    EXPECT_EQ(first.r.last_loss, first.losses.back());
    std::vector<std::string> kept;
    for (const auto& e : fs::directory_iterator(dir / "run")) kept.push_back(e.path().filename().string());
    std::sort(kept.begin(), kept.end());
    EXPECT_EQ(kept, (std::vector<std::string>{"step-00000004", "step-00000005"})) << "saved at 2, 4 and 5; kept 2";

    FitOptions more;
    more.steps = 7, more.resume = dir / "run";
    Seen resumed = run_fit(more);
    EXPECT_EQ(resumed.resumed, 5);
    EXPECT_EQ(resumed.r.start, 5);
    EXPECT_EQ(resumed.before, (std::vector<long>{6, 7}));

    FitOptions all;
    all.steps = 7;
    Seen straight = run_fit(all);
    ASSERT_EQ(straight.losses.size(), 7u);
    EXPECT_EQ(resumed.losses, (std::vector<double>{straight.losses[5], straight.losses[6]})) << "bit for bit";
    EXPECT_EQ(std::vector<double>(straight.losses.begin(), straight.losses.begin() + 5), first.losses);

    FitOptions bad;
    bad.steps = 3, bad.save_every = -1;
    EXPECT_THROW(bad.validate(), ConfigError);
}

}  // namespace fit_test

}  // namespace
}  // namespace duplex
