// duplex._duplex: the Python face of the library (nanobind). Schedules as validated plans and the simulator
// (plans.cpp), the communicator over NumPy arrays and CPU tensors, any DLPack-capable array, zero-copy (comm.cpp),
// and stages written in Python with the trainer that runs them (training.cpp). Waits release the GIL, so
// in-process ranks (threads) run their Python code and their communication side by side.
#include "python/bindings/common.hpp"

#include "core/error.hpp"

namespace nb = nanobind;

NB_MODULE(_duplex, m) {
    using namespace duplex;
    using namespace duplex;
    m.doc() = "Duplex: DualPipe, expert parallelism and ZeRO-1 (C++ core).";

    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const ConfigError& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        } catch (const TimeoutError& e) {
            PyErr_SetString(PyExc_TimeoutError, e.what());
        } catch (const Error& e) {
            PyErr_SetString(PyExc_RuntimeError, e.what());
        }
    });
    // After the generic translator, so tried before it: training stopped on steps that were not finite.
    nb::exception<DivergenceError>(m, "DivergenceError", PyExc_RuntimeError);

    py::bind_plans(m);
    py::bind_comm(m);
    py::bind_training(m);
}
