#include "comm/topology.hpp"

#include <algorithm>
#include <map>

#include <fmt/format.h>
#include <hwloc.h>

#include "core/error.hpp"
#include "core/log.hpp"

namespace duplex {

const char* link_class_name(LinkClass c) {
    switch (c) {
        case LinkClass::Self: return "self";
        case LinkClass::IntraNode: return "intra-node";
        case LinkClass::InterNode: return "inter-node";
    }
    return "?";
}

Topology::Topology(const std::vector<int>& node_of_rank) {
    std::map<int, int> renumber;
    node_.resize(node_of_rank.size());
    local_.resize(node_of_rank.size());
    for (size_t r = 0; r < node_of_rank.size(); ++r) {
        auto [it, fresh] = renumber.emplace(node_of_rank[r], static_cast<int>(renumber.size()));
        if (fresh) ranks_of_node_.emplace_back();
        node_[r] = it->second;
        local_[r] = static_cast<int>(ranks_of_node_[it->second].size());
        ranks_of_node_[it->second].push_back(static_cast<int>(r));
    }
}

Topology Topology::single_node(int world_size) { return Topology(std::vector<int>(world_size, 0)); }

Topology Topology::virtual_nodes(int world_size, int num_nodes) {
    if (num_nodes < 1 || world_size % num_nodes != 0)
        throw ConfigError("--virtual-nodes",
                          fmt::format("{} nodes do not divide {} ranks evenly", num_nodes, world_size));
    std::vector<int> nodes(world_size);
    int per = world_size / num_nodes;
    for (int r = 0; r < world_size; ++r) nodes[r] = r / per;
    return Topology(nodes);
}

Topology Topology::from_hostnames(const std::vector<std::string>& hostnames) {
    std::map<std::string, int> ids;
    std::vector<int> nodes;
    for (const std::string& h : hostnames) nodes.push_back(ids.emplace(h, static_cast<int>(ids.size())).first->second);
    return Topology(nodes);
}

LinkClass Topology::link(int from, int to) const {
    if (from == to) return LinkClass::Self;
    return same_node(from, to) ? LinkClass::IntraNode : LinkClass::InterNode;
}

Topology Topology::subset(const std::vector<int>& members) const {
    std::vector<int> nodes;
    nodes.reserve(members.size());
    for (int m : members) nodes.push_back(node(m));
    return Topology(nodes);
}

std::string Topology::describe() const {
    return fmt::format("{} ranks on {} node{}", size(), num_nodes(), num_nodes() == 1 ? "" : "s");
}

namespace {
struct Hwloc {
    hwloc_topology_t topo = nullptr;
    Hwloc() {
        if (hwloc_topology_init(&topo) != 0 || hwloc_topology_load(topo) != 0) topo = nullptr;
    }
    ~Hwloc() {
        if (topo) hwloc_topology_destroy(topo);
    }
};
Hwloc& hwloc() {
    static Hwloc h;
    return h;
}
}  // namespace

int num_cores() {
    if (!hwloc().topo) return 1;
    int n = hwloc_get_nbobjs_by_type(hwloc().topo, HWLOC_OBJ_CORE);
    return n > 0 ? n : 1;
}

bool ranks_outnumber_cores(const std::vector<std::string>& hostnames, const std::string& host) {
    return std::count(hostnames.begin(), hostnames.end(), host) > num_cores();
}

int bind_thread_to_core(int slot) {
    hwloc_topology_t topo = hwloc().topo;
    if (!topo) return -1;
    int cores = num_cores();
    int index = ((slot % cores) + cores) % cores;
    hwloc_obj_t core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, index);
    if (!core || hwloc_set_cpubind(topo, core->cpuset, HWLOC_CPUBIND_THREAD) != 0) {
        log::warn("comm", "could not bind thread to core {}", index);
        return -1;
    }
    return index;
}

}  // namespace duplex
