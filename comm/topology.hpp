// Where ranks live: world = nodes × local ranks. Built from host names (real placement) or virtually
// (`Topology::virtual_nodes(world, K)`: ranks split into K equal nodes) so that intra-node and inter-node
// traffic can be studied on one machine. Communicators count bytes sent per LinkClass.
//
//   Topology t = Topology::virtual_nodes(8, 2);   // ranks 0-3 on node 0, 4-7 on node 1
//   t.link(1, 5) == LinkClass::InterNode;  t.local_rank(5) == 1;
#pragma once

#include <string>
#include <vector>

namespace duplex {

enum class LinkClass { Self, IntraNode, InterNode };
const char* link_class_name(LinkClass c);

class Topology {
public:
    Topology() = default;
    // node_of_rank[r] = any node label; labels are renumbered 0.. in order of first appearance.
    explicit Topology(const std::vector<int>& node_of_rank);
    static Topology single_node(int world_size);
    // K nodes of world_size / K ranks each; ConfigError unless K divides world_size.
    static Topology virtual_nodes(int world_size, int num_nodes);
    // Ranks sharing a host name share a node.
    static Topology from_hostnames(const std::vector<std::string>& hostnames);

    int size() const { return static_cast<int>(node_.size()); }
    int num_nodes() const { return static_cast<int>(ranks_of_node_.size()); }
    int node(int rank) const { return node_.at(rank); }
    int local_rank(int rank) const { return local_.at(rank); }
    int local_size(int node) const { return static_cast<int>(ranks_of_node_.at(node).size()); }
    const std::vector<int>& ranks_on_node(int node) const { return ranks_of_node_.at(node); }
    bool same_node(int a, int b) const { return node(a) == node(b); }
    LinkClass link(int from, int to) const;
    // The topology of a subgroup: members[i] is the rank (here) of the subgroup's rank i.
    Topology subset(const std::vector<int>& members) const;
    std::string describe() const;

private:
    std::vector<int> node_, local_;
    std::vector<std::vector<int>> ranks_of_node_;
};

// Binds the calling thread to one core chosen by `slot` (modulo the cores hwloc finds). Returns the core
// index, or -1 when binding is not supported here (logged, not an error).
int bind_thread_to_core(int slot);
int num_cores();
// More ranks run on `host` (hostnames: one per world rank) than this machine has cores: a waiting rank should then
// give its core away rather than spin.
bool ranks_outnumber_cores(const std::vector<std::string>& hostnames, const std::string& host);

}  // namespace duplex
