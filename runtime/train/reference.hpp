// How a distributed run is compared with the single-rank reference, and how close it must be: one place for
// the metric and the tolerances, used by `duplex train --check-reference`, the equivalence tests and the GPU
// tests.
//
//   Tolerance tol = reference_tolerance(/*fp64=*/false, /*ep=*/2, /*on_gpu=*/false);
//   ParamDiff d = compare_parameters(distributed, reference);   // d.worst <= tol.param
#pragma once

#include <map>
#include <string>
#include <vector>

namespace duplex {

struct Tolerance {
    double loss;   // relative, per step
    double param;  // relative L2 distance per parameter tensor, after the run
};

// fp64 shows the algorithm is exact (1e-12). fp32 sums in another order drift in the last bits; with EP > 1 an
// expert's weight gradient adds the rows of two replicas' microbatches in one GEMM, an order the single rank
// cannot share, and AdamW's first steps (update ~ lr * sign(g)) turn last-bit differences on near-zero
// gradients into ~1e-5 relative parameter differences. On a GPU cuBLAS picks kernels (and summation orders) by
// shape, and expert row counts differ between the spread-out run and the single rank.
Tolerance reference_tolerance(bool fp64, int ep, bool on_gpu);

// ||have - want|| / ||want||.
template <typename T>
double relative_l2(const std::vector<T>& have, const std::vector<T>& want);

struct ParamDiff {
    double worst = 0;        // the largest relative_l2 over the reference's parameters
    std::string worst_name;
    std::vector<std::string> missing;  // in the reference, not in the run (or of another size)
};
template <typename T>
ParamDiff compare_parameters(const std::map<std::string, std::vector<T>>& have,
                             const std::map<std::string, std::vector<T>>& want);

}  // namespace duplex
