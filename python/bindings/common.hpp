// The pieces of duplex._duplex that several of its files use: arrays and tensors across the language boundary
// (DLPack, no copies but one: see PyStage::forward), and the stage call Python's group operations wait through.
#pragma once

#include <memory>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include "comm/communicator.hpp"
#include "core/dlpack.hpp"
#include "core/tensor.hpp"
#include "runtime/exec/stage.hpp"

namespace duplex::py {

namespace nb = nanobind;

using Array = nb::ndarray<nb::c_contig, nb::device::cpu>;

inline DType dtype_of_dl(nb::dlpack::dtype t) { return dtype_from_dlpack(t.code, t.bits, t.lanes); }
inline DType dtype_of_array(const Array& a) { return dtype_of_dl(a.dtype()); }
inline size_t bytes_of(const Array& a) { return a.nbytes(); }

// A stage call as Python sees it (duplex.torch passes it to the group operations its stage runs): the stage's
// expert-parallel group, and the call's context while the call lasts (null after it returned).
struct StageCall {
    StageContext* ctx = nullptr;
    bool forward_only = false;  // an evaluation forward: no backward follows
    std::shared_ptr<Communicator> ep_group, ep_group_backward;
};

// A blocking wait with the GIL released. Given the stage call it runs in, the wait goes through the executor
// (traced as communication; with one compute stream the other half of an F&B pair runs meanwhile); elsewhere it
// is a plain wait. The GIL is released either way.
inline void wait(const WorkPtr& w, const std::string& what = "communication", const StageCall* call = nullptr) {
    nb::gil_scoped_release release;
    if (call && call->ctx)
        call->ctx->wait(w, what);
    else
        w->wait();
}

// ---- tensors across the language boundary ----

// A framework tensor as a Tensor over the same memory; the Python object stays alive with it (released under
// the GIL, whichever thread drops the last reference). Call with the GIL held.
Tensor tensor_from_py(nb::handle obj);
// A Tensor as a torch tensor sharing its storage. Call with the GIL held.
nb::object tensor_to_torch(const Tensor& t);

// The module's parts, each binding one concern into `m`.
void bind_plans(nb::module_& m);     // schedules as plans, the simulator (plans.cpp)
void bind_comm(nb::module_& m);      // the communicator and launch (comm.cpp)
void bind_training(nb::module_& m);  // stages written in Python, the trainer, the reference model (training.cpp)

}  // namespace duplex::py
