"""The built-in model against an independent PyTorch implementation written from its specification (README,
docs/reference.md), not from the C++: pre-norm RMSNorm, rotary (interleaved pairs) causal multi-head attention,
a SwiGLU FFN in the first layers and in the rest an MoE of shared experts plus routed ones behind sigmoid
affinities and group-limited top-K routing (the bias only selects; gates are the selected affinities normalized
and scaled), the sequence-wise balance loss, cross-entropy, AdamW with decoupled weight decay (torch.optim.AdamW)
and the aux-loss-free bias update. It starts from Duplex's initial weights and must agree in fp64 with Duplex's
single-rank trainer on the loss, every parameter gradient, each MoE layer's expert counts (the router's choices)
and the parameters after each of three AdamW steps, to 1e-9 — on the `small` preset (top-4 of 16 experts in
4 groups, at most 2 groups: K/M = 2), skewed tokens, a bias that the updates make non-zero, balance loss on."""
import math
import unittest

import torch
import torch.nn.functional as F

from duplex import _duplex

TOL = 1e-9


def rms_norm(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rotary(x, base):
    """x [B, S, H, D]; pairs (2i, 2i+1) rotate by position * base^(-2i/D)."""
    B, S, H, D = x.shape
    freq = base ** (-2.0 * torch.arange(D // 2, dtype=x.dtype) / D)
    angle = torch.arange(S, dtype=x.dtype)[:, None] * freq[None, :]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def group_limited_top_k(scores, bias, cfg):
    """Experts chosen per token: the M groups with the highest sum of their top K/M biased scores, then the K
    highest biased scores inside those groups. Selection only: returns indices [T, K]."""
    E, K, G, M = cfg["experts"], cfg["top_k"], cfg["groups"], cfg["top_groups"]
    biased = scores.detach() + bias
    grouped = biased.view(-1, G, E // G)
    group_score = grouped.topk(K // M, dim=-1).values.sum(-1)                     # [T, G]
    groups = group_score.topk(M, dim=-1).indices                                  # [T, M]
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, groups, True)
    masked = biased.masked_fill(~allowed.repeat_interleave(E // G, dim=1), -math.inf)
    return masked.topk(K, dim=-1).indices


class Model:
    def __init__(self, cfg, params):
        self.cfg = cfg
        self.p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}

    def moe(self, layer, x, bias, S):
        cfg, p = self.cfg, self.p
        pre = f"layer{layer}."
        scores = torch.sigmoid(x @ p[pre + "router"])                           # [T, E] affinities
        chosen = group_limited_top_k(scores, bias, cfg)                           # [T, K]
        picked = scores.gather(1, chosen)
        gates = cfg["route_scale"] * picked / picked.sum(-1, keepdim=True)
        out = sum(swiglu(x, p[pre + f"shared{j}.w1"], p[pre + f"shared{j}.w3"], p[pre + f"shared{j}.w2"])
                  for j in range(cfg["shared_experts"]))
        routed = torch.zeros_like(x)
        for e in range(cfg["experts"]):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if len(token):
                y = swiglu(x[token], p[pre + f"expert{e}.w1"], p[pre + f"expert{e}.w3"], p[pre + f"expert{e}.w2"])
                routed = routed.index_add(0, token, gates[token, slot, None] * y)
        counts = torch.bincount(chosen.reshape(-1), minlength=cfg["experts"])
        # Sequence-wise balance loss: alpha * sum_i f_i P_i per sequence, averaged over the sequences, with
        # f_i = E / (K S) * (the sequence's tokens routed to i) and P_i the mean normalized affinity.
        aux = torch.zeros((), dtype=x.dtype)
        if cfg["balance_alpha"] > 0:
            E, K = cfg["experts"], cfg["top_k"]
            seq_chosen = chosen.view(-1, S, K)
            seq_scores = (scores / scores.sum(-1, keepdim=True)).view(-1, S, E)
            for b in range(seq_chosen.shape[0]):
                f = torch.bincount(seq_chosen[b].reshape(-1), minlength=E).to(x.dtype) * E / (K * S)
                aux = aux + cfg["balance_alpha"] * (f * seq_scores[b].mean(0)).sum()
            aux = aux / seq_chosen.shape[0]
        return out + routed, counts, aux

    def loss(self, tokens, targets, biases):
        """One microbatch: (cross-entropy mean over its tokens, balance loss summed over MoE layers, counts)."""
        cfg, p = self.cfg, self.p
        B, S = tokens.shape
        H, D = cfg["heads"], cfg["head_dim"]
        x = p["embed"][tokens.reshape(-1)]
        aux, counts = torch.zeros((), dtype=x.dtype), []
        for layer in range(cfg["layers"]):
            pre = f"layer{layer}."
            n = rms_norm(x, p[pre + "attn_norm"], cfg["norm_eps"])
            q = rotary((n @ p[pre + "wq"]).view(B, S, H, D), cfg["rope_base"])
            k = rotary((n @ p[pre + "wk"]).view(B, S, H, D), cfg["rope_base"])
            v = (n @ p[pre + "wv"]).view(B, S, H, D)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
            x = x + att.transpose(1, 2).reshape(B * S, H * D) @ p[pre + "wo"]
            n = rms_norm(x, p[pre + "ffn_norm"], cfg["norm_eps"])
            if layer < cfg["dense_layers"]:
                x = x + swiglu(n, p[pre + "w1"], p[pre + "w3"], p[pre + "w2"])
            else:
                y, c, a = self.moe(layer, n, biases[len(counts)], S)
                x, aux = x + y, aux + a
                counts.append(c)
        logits = rms_norm(x, p["final_norm"], cfg["norm_eps"]) @ p["head"]
        return F.cross_entropy(logits, targets.reshape(-1)), aux, counts


class BuiltinModelAgainstPyTorch(unittest.TestCase):
    def test_three_steps_of_the_small_preset(self):
        torch.set_default_dtype(torch.float64)
        microbatches, lr, wd, speed = 2, 3e-3, 0.1, 0.01
        ref = _duplex._ModelReference(model="small", seed=3, microbatches=microbatches, sequences=2, token_skew=0.8,
                                      bias_update_speed=speed, balance_alpha=1e-3, lr=lr, weight_decay=wd)
        cfg = ref.config()
        self.assertGreater(cfg["top_k"] // cfg["top_groups"], 1)
        model = Model(cfg, ref.parameters())
        matrices = [t for t in model.p.values() if t.dim() > 1]
        vectors = [t for t in model.p.values() if t.dim() <= 1]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": wd}, {"params": vectors, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95), eps=1e-8)
        biases = [torch.zeros(cfg["experts"]) for _ in range(cfg["layers"] - cfg["dense_layers"])]
        for step in range(1, 4):
            for mine, theirs in zip(biases, ref.router_bias()):
                self.assertTrue(torch.equal(mine, torch.from_numpy(theirs)), f"step {step}: router bias")
            if step > 1:
                self.assertTrue(any(b.abs().max() > 0 for b in biases), "the bias should be non-zero by now")
            got = ref.step()
            total_ce, total_aux, step_counts = 0.0, 0.0, None
            for mb in range(microbatches):
                tokens, targets = (torch.tensor(t) for t in ref.batch(step, mb))
                ce, aux, counts = model.loss(tokens, targets, biases)
                ((ce + aux) / microbatches).backward()
                total_ce += float(ce.detach()) / microbatches
                total_aux += float(aux.detach()) / microbatches
                step_counts = counts if step_counts is None else [a + b for a, b in zip(step_counts, counts)]
            self.assertLessEqual(abs(got["loss"] - total_ce), TOL * abs(total_ce), f"step {step}: loss")
            self.assertLessEqual(abs(got["aux_loss"] - total_aux), TOL * abs(total_aux) + 1e-15, f"step {step}: aux")
            self.assertEqual([c.tolist() for c in step_counts], ref.expert_counts(), f"step {step}: expert counts")
            grads = ref.gradients()
            self.assertEqual(sorted(grads), sorted(model.p))
            for name, t in model.p.items():
                want = t.grad if t.grad is not None else torch.zeros_like(t)  # an expert no token chose
                have = torch.from_numpy(grads[name])
                self.assertLessEqual(float((have - want).norm()), TOL * float(want.norm()) + 1e-15,
                                     f"step {step}: gradient of {name}")
            for t in model.p.values():  # an unchosen expert's gradient is zero (Duplex steps it: decay, moments)
                if t.grad is None:
                    t.grad = torch.zeros_like(t)
            opt.step()
            opt.zero_grad(set_to_none=False)
            for b, c in zip(biases, step_counts):  # b_i += speed * sign(mean load - load_i)
                b += speed * torch.sign(c.double().mean() - c.double())
            values = ref.parameters()
            for name, t in model.p.items():
                have = torch.from_numpy(values[name])
                self.assertLessEqual(float((have - t.detach()).norm()), TOL * float(t.detach().norm()),
                                     f"step {step}: parameter {name} after AdamW")


if __name__ == "__main__":
    unittest.main(verbosity=2)
