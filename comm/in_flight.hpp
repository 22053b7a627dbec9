// The requests a backend (MPI, UCX) has handed to its library and not yet seen complete, linked through themselves:
// listing and unlisting allocate nothing, and a request leaves the list the moment its completion is seen, so a
// stream of small messages keeps no garbage for the progress thread to sweep (a list swept only by a napping thread
// grew by thousands of finished requests a nap, and the heap with it). The owner's lock guards it.
//
//   struct MyRequest : Request, InFlightLinks<MyRequest> { ... };
//   InFlight<MyRequest> in_flight;          // under the backend's lock
//   in_flight.add(req);  ...  auto keep = in_flight.remove(*req);
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace duplex {

// What a listed request carries: its own reference while listed (it stays alive while the library holds it) and
// its neighbours.
template <typename R>
struct InFlightLinks {
    std::shared_ptr<R> self;
    R* prev = nullptr;
    R* next = nullptr;
};

template <typename R>
class InFlight {
public:
    InFlight() = default;
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
    ~InFlight() {
        while (head_) remove(*head_);  // what never completed (a lost peer's): its self-reference goes too
    }

    void add(const std::shared_ptr<R>& r) {
        r->self = r;
        r->prev = nullptr;
        r->next = head_;
        if (head_) head_->prev = r.get();
        head_ = r.get();
        ++size_;
    }
    // Unlists r and hands back its reference (null if it was not listed).
    std::shared_ptr<R> remove(R& r) {
        if (!r.self) return nullptr;
        (r.prev ? r.prev->next : head_) = r.next;
        if (r.next) r.next->prev = r.prev;
        r.prev = r.next = nullptr;
        --size_;
        return std::move(r.self);
    }
    bool empty() const { return size_ == 0; }
    size_t size() const { return size_; }
    std::vector<std::shared_ptr<R>> list() const {
        std::vector<std::shared_ptr<R>> out;
        out.reserve(size_);
        for (R* r = head_; r; r = r->next) out.push_back(r->self);
        return out;
    }
    // Calls fn(R&) for every listed request; fn must not add or remove.
    template <typename Fn>
    void for_each(Fn&& fn) const {
        for (R* r = head_; r; r = r->next) fn(*r);
    }

private:
    R* head_ = nullptr;
    size_t size_ = 0;
};

}  // namespace duplex
