"""A Hugging Face `transformers` causal language model trained with Duplex: built from a small config (random
weights, nothing downloaded), split by its decoder layers into pipeline stages, trained with DualPipeV in BF16 on
fp32 master weights (ZeroAdamW). Between stages travel the hidden states and the position ids (BF16 and int64);
the sequence length changes every step. Prints the loss and the step time; --check first compares a step's
per-microbatch losses with the whole model run by transformers itself.

    python examples/hf_pipeline.py                         # DualPipeV, 8 stages on 4 in-process ranks
    python examples/hf_pipeline.py --ranks 2 --dp 2 --steps 20 --check
    mpirun -np 4 python examples/hf_pipeline.py --backend mpi
"""
import argparse
import threading
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import duplex
import duplex.torch as dt


def make_model(a):
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                         num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"  # causal attention without a mask tensor
    torch.manual_seed(a.seed)
    return LlamaForCausalLM(config).to(torch.bfloat16)


class Stage(torch.nn.Module):
    """Decoder layers [first, last) of the model; the first stage embeds the tokens, the last applies the final norm
    and the output head. In: token ids or hidden states, and the position ids; out: (hidden, position ids), or the
    logits on the last stage."""

    def __init__(self, model, layers, first, last):
        super().__init__()
        inner = model.model
        self.embed = inner.embed_tokens if first else None
        self.layers = torch.nn.ModuleList(inner.layers[i] for i in layers)
        self.rotary = inner.rotary_emb  # no trained weights: each stage computes its own rotary embeddings
        self.norm, self.head = (inner.norm, model.lm_head) if last else (None, None)

    def forward(self, x, position_ids):
        h = self.embed(x) if self.embed is not None else x
        rope = self.rotary(h, position_ids)
        for layer in self.layers:
            out = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
        if self.head is None:
            return h, position_ids
        return self.head(self.norm(h))


def split_layers(layers, stages):
    per, extra = divmod(layers, stages)
    out, at = [], 0
    for s in range(stages):
        n = per + (1 if s < extra else 0)
        out.append(range(at, at + n))
        at += n
    return out


def batch(step, sequences, a):
    """Token sequences where each token follows from the one before it (something to learn), except for a random
    token now and then; the length changes from step to step."""
    seq = a.seq + 8 * (step % 3)
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(a.vocab, (sequences, seq + 1), generator=g)
    keep = torch.rand(sequences, seq + 1, generator=g) < 0.9
    for t in range(1, seq + 1):
        x[:, t] = torch.where(keep[:, t], (7 * x[:, t - 1] + 3) % a.vocab, x[:, t])
    positions = torch.arange(seq).repeat(sequences, 1)
    return (x[:, :-1], positions), x[:, 1:]


def loss_fn(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def whole_model_losses(a, inputs, labels, chunks):
    """The same microbatches through the unsplit transformers model."""
    model = make_model(a)
    tokens, positions = inputs
    with torch.no_grad():
        return [float(loss_fn(model(input_ids=t, position_ids=p).logits, y))
                for t, p, y in zip(tokens.chunk(chunks), positions.chunk(chunks), labels.chunk(chunks))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inproc", help="inproc (threads), mpi or ucx (processes under mpirun)")
    ap.add_argument("--ranks", type=int, default=4, help="pipeline ranks per replica (DualPipeV: 2 stages each)")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    ap.add_argument("--microbatches", type=int, default=8, help="per replica (DualPipeV: at least 2 x ranks)")
    ap.add_argument("--sequences", type=int, default=2, help="sequences per microbatch")
    ap.add_argument("--seq", type=int, default=32, help="the shortest sequence length (it changes every step)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=97)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare step 1's losses with the whole model first")
    a = ap.parse_args()
    pp = 2 * a.ranks
    if a.layers < pp:
        ap.error(f"--layers {a.layers}: DualPipeV over {a.ranks} ranks has {pp} stages, each needs a layer")
    layers = split_layers(a.layers, pp)
    init = threading.Lock()
    per_step = a.dp * a.microbatches * a.sequences

    def rank_main(world):
        with init:  # in-process ranks are threads: one at a time through torch's global RNG
            model = make_model(a)
        mine = [Stage(model, layers[s], s == 0, s == pp - 1)
                for s in duplex.stages_of_rank("dualpipev", pp, world.rank // a.dp)]
        pipe = dt.Pipeline(world, mine, schedule="dualpipev", pp=pp, dp=a.dp, microbatches=a.microbatches,
                           loss_fn=loss_fn, optimizer=dt.ZeroAdamW(lr=a.lr, weight_decay=0.0))
        for step in range(1, a.steps + 1):
            inputs, labels = batch(step, per_step, a)
            t0 = time.perf_counter()
            loss = pipe.step(inputs, labels)
            took = time.perf_counter() - t0
            if world.rank == 0 and step == 1 and a.check:
                want = whole_model_losses(a, inputs, labels, a.dp * a.microbatches)
                got = pipe.last_metrics["losses"]
                worst = max(abs(x - y) / abs(y) for x, y in zip(got, want))
                print(f"check: step 1's {len(got)} microbatch losses vs the whole transformers model: largest "
                      f"relative difference {worst:.2e}", flush=True)
                if worst > 1e-2:
                    raise SystemExit(f"check failed: {got} vs {want}")
            if world.rank == 0 and (step <= 3 or step % 10 == 0 or step == a.steps):
                print(f"step {step:3d}  seq {inputs[0].shape[1]:3d}  loss {loss:.4f}  step time {1e3 * took:7.1f} ms",
                      flush=True)
        pipe.close()

    n_params = sum(p.numel() for p in make_model(a).parameters())
    print(f"# transformers LlamaForCausalLM, {a.layers} layers, {n_params / 1e6:.2f} M parameters in BF16 (fp32 "
          f"masters); DualPipeV: {pp} stages on {a.ranks} ranks x DP {a.dp}, {a.microbatches} microbatches",
          flush=True)
    duplex.launch(rank_main, ranks=a.ranks * a.dp, backend=a.backend, timeout_s=600)


if __name__ == "__main__":
    main()
