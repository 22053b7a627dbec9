#include "runtime/train/reference.hpp"

#include <algorithm>
#include <cmath>

namespace duplex {

Tolerance reference_tolerance(bool fp64, int ep, bool on_gpu) {
    if (on_gpu) return {1e-4, 1e-3};
    if (fp64) return {1e-12, 1e-12};
    return {1e-5, ep > 1 ? 5e-5 : 1e-5};
}

template <typename T>
double relative_l2(const std::vector<T>& have, const std::vector<T>& want) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < want.size() && i < have.size(); ++i) {
        double d = double(have[i]) - double(want[i]);
        diff += d * d;
        norm += double(want[i]) * double(want[i]);
    }
    if (have.size() != want.size()) return INFINITY;
    return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

template <typename T>
ParamDiff compare_parameters(const std::map<std::string, std::vector<T>>& have,
                             const std::map<std::string, std::vector<T>>& want) {
    ParamDiff d;
    for (const auto& [name, w] : want) {
        auto it = have.find(name);
        if (it == have.end() || it->second.size() != w.size()) {
            d.missing.push_back(name);
            continue;
        }
        double rel = relative_l2(it->second, w);
        if (rel > d.worst || d.worst_name.empty()) d.worst = std::max(d.worst, rel), d.worst_name = name;
    }
    if (!d.missing.empty()) d.worst = INFINITY;
    return d;
}

template double relative_l2<float>(const std::vector<float>&, const std::vector<float>&);
template double relative_l2<double>(const std::vector<double>&, const std::vector<double>&);
template ParamDiff compare_parameters<float>(const std::map<std::string, std::vector<float>>&,
                                             const std::map<std::string, std::vector<float>>&);
template ParamDiff compare_parameters<double>(const std::map<std::string, std::vector<double>>&,
                                              const std::map<std::string, std::vector<double>>&);

}  // namespace duplex
