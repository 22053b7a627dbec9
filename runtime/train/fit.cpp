#include "runtime/train/fit.hpp"

#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex {

void FitOptions::validate() const {
    DUPLEX_CHECK_ARG(steps >= 0, "--steps", "must not be negative, got {}", steps);
    DUPLEX_CHECK_ARG(save_every >= 0 && keep >= 0, "--save-every/--keep", "must be 0 or more");
    DUPLEX_CHECK_ARG(max_bad_steps >= 0, "--max-bad-steps", "must be 0 or more, got {}", max_bad_steps);
}

template <typename T>
FitResult fit(PipelineTrainer<T>& trainer, const FitOptions& o, const FitCallbacks& cb) {
    o.validate();
    FitResult r;
    if (!o.resume.empty()) {
        Stopwatch sw;
        r.start = trainer.load_checkpoint(o.resume);
        if (cb.on_resume) cb.on_resume(r.start, sw.seconds());
    } else {
        r.start = trainer.steps_done();
    }
    auto save = [&](const char* why) {
        Stopwatch sw;
        std::string dir = trainer.save_checkpoint(o.save, o.keep);
        if (cb.on_save) cb.on_save(dir, why, sw.seconds());
    };
    for (long s = trainer.steps_done(); s < o.steps; ++s) {
        if (cb.before_step) cb.before_step(s + 1);
        StepMetrics m = trainer.step();
        if (std::isnan(r.first_loss)) r.first_loss = m.loss;
        r.last_loss = m.loss;
        if (cb.on_step) cb.on_step(m);
        if (!m.applied) {
            if (o.max_bad_steps > 0 && m.bad_steps_in_a_row >= o.max_bad_steps)
                throw DivergenceError(fmt::format("stopped after {} step(s) in a row that were not finite, none applied; "
                                                  "the last checkpoint is as it was. Last: {}",
                                                  m.bad_steps_in_a_row, m.not_applied));
            continue;  // not checkpointed: the weights are those of the last applied step
        }
        if (!o.save.empty() && o.save_every > 0 && m.step % o.save_every == 0 && m.step < o.steps) save("every N steps");
    }
    r.steps_done = trainer.steps_done();
    if (!o.save.empty() && r.steps_done > r.start && trainer.last_step_applied()) save("end of run");
    return r;
}

template FitResult fit<float>(PipelineTrainer<float>&, const FitOptions&, const FitCallbacks&);
template FitResult fit<double>(PipelineTrainer<double>&, const FitOptions&, const FitCallbacks&);

}  // namespace duplex
