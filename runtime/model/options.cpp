#include "runtime/model/options.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace duplex {

ModelConfig ModelOptions::model_config() const {
    ModelConfig c = ModelConfig::preset(model);
    if (bias_update_speed >= 0) c.bias_update_speed = bias_update_speed;
    DUPLEX_CHECK_ARG(balance_alpha >= 0, "--balance-alpha", "must not be negative, got {}", balance_alpha);
    c.balance_alpha = balance_alpha;
    if (layers >= 0) {
        DUPLEX_CHECK_ARG(layers >= 1 && layers <= 4096, "--layers", "between 1 and 4096, got {}", layers);
        c.dense_layers = std::min(c.dense_layers, layers);
        c.layers = layers;
    }
    if (dense_layers >= 0) {
        DUPLEX_CHECK_ARG(dense_layers <= c.layers, "--dense-layers", "the {} model has {} layers, got {}", c.name,
                         c.layers, dense_layers);
        c.dense_layers = dense_layers;
    }
    c.validate();
    return c;
}

}  // namespace duplex
