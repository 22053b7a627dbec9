// The built-in model's own options: which preset, its overrides, its initialization seed and how it trains its
// router and recomputes its activations. The trainer's options (runtime/train/trainer.hpp) extend these with the
// step loop's; the built-in stage (runtime/model/builtin_stage.hpp) takes only these.
//
//   ModelOptions m; m.model = "small"; m.layers = 8;
//   ModelConfig c = m.model_config();   // the preset with the overrides, validated
#pragma once

#include <cstdint>
#include <string>

#include "runtime/model/config.hpp"

namespace duplex {

struct ModelOptions {
    std::string model = "tiny";
    uint64_t seed = 1;
    bool recompute = false;
    bool bias_update = true;
    double bias_update_speed = -1;  // gamma; < 0: the model preset's (0.001 as in V3)
    double balance_alpha = 0.0;     // sequence-wise balance loss weight (V3: 0.0001); 0: off
    int dense_layers = -1;    // >= 0: override the preset's number of leading dense layers
    int layers = -1;          // >= 1: override the preset's number of layers (e.g. 16 stages of a 4-layer preset)
    // The preset named by `model` with the overrides above applied (validated).
    ModelConfig model_config() const;
};

}  // namespace duplex
