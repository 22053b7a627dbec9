"""duplex.torch's expert parallelism: dispatch and combine as autograd functions over a stage's expert-parallel group
(re-exported by duplex.torch: dispatch, combine, mark_experts, ep_group, Routed). Inside a Pipeline stage their waits
go through Duplex's executor, which runs the other half of an F&B pair meanwhile."""
import threading

import torch

_current = threading.local()  # the stage call (duplex._duplex.StageCall) running on this thread


def _call():
    return getattr(_current, "call", None)


def _current_world():
    """The world of the duplex.torch.run rank function running on this thread (None elsewhere)."""
    return getattr(_current, "world", None)


def ep_group():
    """The expert-parallel group of the stage being run on this thread (None outside a Pipeline or without EP)."""
    call = _call()
    return None if call is None else call.ep_group


class Routed:
    """What dispatch() returns beside the rows: how combine() takes results back to their tokens.

    tags: the tags that came with the rows received here (int64, one per row; None without tags).
    crossings: rows this rank sent to ranks on other nodes in the dispatch — once per (token, slot) on the flat
    path, once per (token, target node) on the node-limited path.
    node_limited: which path the rows took."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _groups(explicit):
    """(forward group, backward group, stage call) of an explicit group (no call: plain waits) or of the stage call
    running on this thread, whose waits go through Duplex's executor."""
    if explicit is not None:
        return explicit, explicit, None
    call = _call()
    if call is None or call.ep_group is None:
        raise RuntimeError("duplex.torch.dispatch runs inside a Pipeline stage with ep > 1 (or pass group=)")
    return call.ep_group, call.ep_group_backward, call


def _exchange(group, rows, send_rows, recv_rows, what, call):
    rows = rows.contiguous()
    out = rows.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
    group.all_to_all_v(rows.detach(), send_rows, out, recv_rows, what, call=call)
    return out


class _Move(torch.autograd.Function):
    """Rows over the expert-parallel group (all-to-all-v, send_rows[p] to rank p); the gradient runs the same
    exchange backwards on the group of backward exchanges, waited for through the stage call running it."""

    @staticmethod
    def forward(ctx, rows, explicit, send_rows, recv_rows, what):
        ctx.explicit, ctx.send_rows, ctx.recv_rows, ctx.what = explicit, send_rows, recv_rows, what
        group, _, call = _groups(explicit)
        return _exchange(group, rows, send_rows, recv_rows, what, call)

    @staticmethod
    def backward(ctx, g):
        _, group, call = _groups(ctx.explicit)
        back = _exchange(group, g, ctx.recv_rows, ctx.send_rows, ctx.what + " (backward)", call)
        return back, None, None, None, None


def _counts(group, columns, call):
    """Exchanges per-peer counts: columns are [G] int64 tensors, column j of the answer is what each peer sent
    in its column j to this rank. Returns lists."""
    send = torch.stack(columns, 1).contiguous()
    recv = torch.empty_like(send)
    group.all_to_all(send, recv, call=call)
    return [recv[:, j].tolist() for j in range(len(columns))]


def mark_experts(module):
    """Marks a module's parameters as routed-expert weights: each rank of an EP group holds its own, so their
    gradients are summed over the expert-data-parallel group (DP / EP replicas), not over DP."""
    for p in module.parameters():
        p._duplex_expert = True
    return module


def dispatch(x, dest, tags=None, node_limited=None, group=None):
    """Sends token x[n] to the ranks dest[n, k] of the stage's expert-parallel group, one row per slot k (dest [N]
    is one slot per token). Returns the rows received here and a Routed handle for combine(). Differentiable;
    inside a Pipeline stage its waits go through Duplex's executor, which runs the other half of an F&B pair
    meanwhile.

    tags (int64, shaped like dest, e.g. the expert ids) travel with the rows: routed.tags says, per row received,
    which tag it carries. Rows arrive grouped by the rank that sent them here; use the tags to find their expert.

    node_limited (default True; taken when the group spans more than one node, as every Duplex exchange does): a
    token crosses to each node it targets once, to the rank there with this rank's local index (the relay), which
    forwards one row per slot inside its node — DeepSeek-V3's dispatch. False: one row per slot straight to its
    rank. The path and the relays come from the expert-parallel plan (Communicator.expert_path, .relays).

    group: the communicator to use outside a Pipeline (default: the running stage's expert-parallel group)."""
    explicit = group
    group, _, call = _groups(explicit)
    G, N = group.size, x.shape[0]
    slots = dest.to(torch.int64).reshape(N, -1)
    K = slots.shape[1]
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= G):
        raise ValueError(f"dispatch: destinations must be ranks 0..{G - 1} of the expert-parallel group")
    if tags is not None:
        tags = tags.to(torch.int64).reshape(N, K)
        if tags.shape != slots.shape:
            raise ValueError(f"dispatch: tags of shape {tuple(tags.shape)} for destinations {tuple(dest.shape)}")
    node_limited = group.expert_path(True if node_limited is None else node_limited) == "node-limited"
    node_list = group.nodes  # one call: each builds the list in C++
    nodes = torch.tensor(node_list, dtype=torch.int64)
    token = torch.arange(N).repeat_interleave(K)  # the token of each slot (slot s = n * K + k)
    flat_dest = slots.reshape(-1)
    if not node_limited:
        order = torch.argsort(flat_dest, stable=True)
        send = torch.bincount(flat_dest, minlength=G)
        (recv,) = _counts(group, [send], call)
        send = send.tolist()
        rows = _Move.apply(x[token[order]], explicit, send, recv, "dispatch")
        got_tags = None if tags is None else _exchange(group, tags.reshape(-1)[order], send, recv, "dispatch tags", call)
        crossings = int((nodes[flat_dest] != nodes[group.rank]).sum())
        return rows, Routed(node_limited=False, explicit=explicit, tokens=N, top_k=K, order=order, send=send, recv=recv,
                            tags=got_tags, crossings=crossings)

    # Node-limited: hop 1 crosses once per (token, target node) to the relay there; hop 2 stays inside the node.
    me = group.rank
    try:
        relay_of = group.relays  # the plan's relay per destination rank
    except ValueError as e:
        raise ValueError(f"dispatch: {e} (use node_limited=False)") from None
    relay = torch.tensor(relay_of, dtype=torch.int64)[flat_dest]  # per slot
    key = relay * N + token                                        # one hop-1 row per distinct key
    keys, row_of_slot = torch.unique(key, sorted=True, return_inverse=True)
    row_relay, row_token = keys // N, keys % N
    send1 = torch.bincount(row_relay, minlength=G)
    slot_order = torch.argsort(key * K + torch.arange(N * K) % K)  # slots by (relay, token, k)
    slot_send = torch.bincount(relay, minlength=G)
    first_row = torch.cumsum(send1, 0) - send1
    meta = torch.stack([row_of_slot - first_row[relay], flat_dest,
                        tags.reshape(-1) if tags is not None else torch.zeros_like(flat_dest)], 1)[slot_order]
    recv1, slot_recv = _counts(group, [send1, slot_send], call)
    send1, slot_send = send1.tolist(), slot_send.tolist()
    rows1 = _Move.apply(x[row_token], explicit, send1, recv1, "dispatch (inter-node)")
    meta_in = _exchange(group, meta, slot_send, slot_recv, "dispatch routes", call)
    # On the relay: each slot received -> its hop-1 row here, then one row per slot to the expert's rank.
    src = torch.repeat_interleave(torch.arange(G), torch.tensor(slot_recv, dtype=torch.int64))
    recv1_t = torch.tensor(recv1, dtype=torch.int64)
    at_row = (torch.cumsum(recv1_t, 0) - recv1_t)[src] + meta_in[:, 0]
    dest2 = meta_in[:, 1]
    if dest2.numel() and bool((nodes[dest2] != nodes[me]).any()):
        raise RuntimeError(f"dispatch: rank {me} was asked to relay a row outside its node (inconsistent topology)")
    order2 = torch.argsort(dest2, stable=True)
    send2 = torch.bincount(dest2, minlength=G)
    (recv2,) = _counts(group, [send2], call)
    send2 = send2.tolist()
    rows = _Move.apply(rows1[at_row[order2]], explicit, send2, recv2, "dispatch (intra-node)")
    got_tags = None if tags is None else _exchange(group, meta_in[order2, 2], send2, recv2, "dispatch tags", call)
    crossings = int((nodes[row_relay] != nodes[me]).sum())
    return rows, Routed(node_limited=True, explicit=explicit, tokens=N, top_k=K, rows1=len(keys), row_token=row_token,
                        send1=send1, recv1=recv1, slot_order=slot_order, slot_send=slot_send, slot_recv=slot_recv,
                        at_row=at_row, order2=order2, send2=send2, recv2=recv2, tags=got_tags, crossings=crossings)


def combine(rows, routed, weights=None):
    """Takes the rows dispatch() delivered here (or results computed from them, one per row, same order) back to
    their tokens: returns [N, ...] in the order of dispatch's x, the sum over each token's slots of
    weights[n, k] * result (weights shaped like dest; default 1). On the node-limited path the relay adds up the
    weighted results of its node before the one crossing back. Differentiable (in rows and weights)."""
    r, explicit = routed, routed.explicit
    rest = tuple(rows.shape[1:])
    if weights is not None:
        weights = weights.reshape(r.tokens * r.top_k)
    if not r.node_limited:
        back = _Move.apply(rows, explicit, r.recv, r.send, "combine")
        res = back[torch.argsort(r.order)].reshape((r.tokens, r.top_k) + rest)
        if weights is not None:
            res = res * weights.reshape((r.tokens, r.top_k) + (1,) * len(rest))
        return res.sum(1)
    back = _Move.apply(rows, explicit, r.recv2, r.send2, "combine (intra-node)")  # on the relay, one per slot
    out = back[torch.argsort(r.order2)]                                       # in the order the slots came
    if weights is not None:
        w = _Move.apply(weights[r.slot_order].contiguous(), explicit, r.slot_send, r.slot_recv, "combine weights")
        out = out * w.reshape((-1,) + (1,) * len(rest))
    partial = out.new_zeros((sum(r.recv1),) + rest).index_add(0, r.at_row, out)  # one row per (token, node)
    home = _Move.apply(partial, explicit, r.recv1, r.send1, "combine (inter-node)")
    return home.new_zeros((r.tokens,) + rest).index_add(0, r.row_token, home)
