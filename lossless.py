"""
Lossless LoRA-Drop: LoRA steps draft tokens and the full model verifies them (self-speculative decoding).

    python generate.py --lossless                       # greedy: the same text as plain decoding
    python generate.py --lossless --temperature 0.8     # sampling: the full model's distribution
    python generate.py --lossless --adaptive-drafts     # fewer drafts while they are rejected
    python bench.py --lossless-suite                    # speed and acceptance rate on 24 prompts

One cycle, with refresh period k. At its start, every layer's KV cache contains positions
0..n-1 exactly as the full model computes them, and the droppable layers' anchors are at n-1.
The pending token t, chosen by the full model and not yet fed, goes to position n.

1. Draft: feed t and then each new draft as a LoRA step, k - 1 times, which gives the drafts
   d_1 .. d_{k-1} and their draft distributions.
2. Roll back: truncate the cache to n positions. The LoRA steps wrote keys and values into the
   layers outside the droppable set, computed from an approximate residual stream.
3. Verify: one `extend` pass runs every layer on [t, d_1, .., d_{k-1}], writes every layer's
   keys and values for those k positions, and returns the full model's logits at each of them.
4. Accept the longest prefix of drafts that the full model agrees with, then take the full
   model's own token at the first rejected draft, or a bonus token when every draft passes.
5. Truncate the cache to the accepted positions and move the droppable layers' anchors to the
   last accepted position, so the verification pass also serves as the cycle's refresh step.

Cost: k - 1 LoRA steps plus one full pass over k tokens, for 1 to k new tokens. Decoding is
bound by weight reads, and one pass over k tokens reads every weight once, so for small k it
costs about one full decode step (an estimate: on a CPU the extra tokens add some compute).
When every draft passes, a cycle costs what k steps of fixed-period LoRA-Drop cost. When the
first draft fails, it yields one token for the price of k passes, which is slower than plain
decoding. The speed therefore depends on the acceptance rate.

KV cache: the verification writes every layer's keys and values at every accepted position,
so droppable layers store every position, as in plain decoding. Lossless mode gives up
LoRA-Drop's KV-cache saving and keeps only the compute saving, so it needs a cache with full
capacity in every layer (`model.new_cache(1, n, drop=None)`).

Acceptance rule. Greedy (temperature 0): a draft passes when it equals the full model's argmax,
so the output is the plain model's greedy output. Sampling (speculative sampling): with p the
full model's distribution and q the draft distribution at a position, both after the same
temperature, top-k and top-p, draft d passes with probability min(1, p(d) / q(d)). The first
rejected draft is replaced by a sample from max(0, p - q), normalised, and after all drafts pass the
bonus token is sampled from p. Each emitted token then has exactly the distribution p, so the
output follows the full model's distribution.

Adaptive draft length (`adaptive_drafts=True`, `generate.py --lossless --adaptive-drafts`).
A cycle may draft fewer than k - 1 tokens, and a cycle with no draft is one plain decode step.
The first cycle drafts one token. After a cycle in which every draft passed, the next cycle
drafts one more, up to k - 1. After a rejection, the next cycle drafts as many as were
accepted. When no draft was accepted, the mode backs off: it runs cycles without drafts, 1 the
first time, then 2, 4 and so on up to MAX_BACKOFF, and after each such wait one cycle probes
with a single draft. A cycle with an accepted draft halves the backoff, so a lucky draft now
and then does not bring back frequent probes. With drafts that always fail, lossless mode thus
costs about what plain decoding costs, instead of k passes per token. The draft length depends
only on earlier acceptances, so greedy output and the sampled distribution stay exact.
"""

import statistics
import time
from dataclasses import dataclass

import torch

from lora_drop import check_sampling, generate, prompt_tensor, sampling_probs


MAX_BACKOFF = 64  # adaptive draft length: maximum number of cycles without drafts between two probes


@dataclass
class LosslessStats:
    """Counts from lossless decoding, summed over every call that is given the same object."""

    cycles: int = 0  # verification passes run, including those of cycles without drafts
    drafted: int = 0  # draft tokens proposed by LoRA steps
    accepted: int = 0  # draft tokens the full model accepted
    undrafted: int = 0  # cycles with no draft (backing off, or period 1): plain decode steps

    @property
    def acceptance_rate(self):
        """Share of drafted tokens that the full model accepted."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_cycle(self):
        """Mean tokens one cycle yields: the accepted drafts plus the full model's own token."""
        return (self.accepted + self.cycles) / self.cycles if self.cycles else float("nan")

    def summary(self):
        return {
            "cycles": self.cycles,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "undrafted": self.undrafted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_cycle": self.tokens_per_cycle,
        }


class DraftLength:
    """Adaptive draft length rule (see the module docstring): the number of drafts for each next cycle."""

    def __init__(self, max_drafts, max_backoff=MAX_BACKOFF):
        self.max_drafts = max_drafts
        self.max_backoff = max_backoff
        self.length = min(1, max_drafts)  # drafts per cycle while drafting pays; 0 while backing off
        self.wait = 0  # cycles without drafts left before the next probe
        self.backoff = 1  # the wait after the next failed probe

    def next(self):
        """Return the number of drafts for the next cycle."""
        if self.length > 0:
            return self.length
        if self.wait > 0:
            self.wait -= 1
            return 0
        return 1  # probe

    def update(self, n_drafted, n_accepted):
        """Record a cycle's outcome."""
        if n_drafted == 0:
            return
        if n_accepted > 0:
            self.backoff = max(1, self.backoff // 2)
        if n_accepted == n_drafted:
            self.length = min(self.max_drafts, n_drafted + 1)
            return
        self.length = n_accepted
        if self.length == 0:
            self.wait = self.backoff
            self.backoff = min(2 * self.backoff, self.max_backoff)


def accept_drafts(drafts, draft_probs, target_logits, temperature, top_k=None, top_p=None, generator=None):
    """Verify drafted tokens against the full model; return (number accepted, next token).

    drafts: list of m token ids. target_logits: (m + 1, vocab), the full model's logits after
    the pending token and after each draft. draft_probs: (m, vocab), the distributions the
    drafts were sampled from (unused when greedy). The next token replaces the first rejected
    draft, or follows the last draft when all pass.
    """
    if temperature == 0:
        choices = target_logits.argmax(dim=-1).tolist()
        for i, draft in enumerate(drafts):
            if draft != choices[i]:
                return i, choices[i]
        return len(drafts), choices[len(drafts)]

    target_probs = sampling_probs(target_logits, temperature, top_k, top_p)  # (m + 1, vocab)
    for i, draft in enumerate(drafts):
        p, q = target_probs[i], draft_probs[i]
        u = torch.rand((), generator=generator, device=p.device)
        # Accept with probability min(1, p/q), written without a division; q[draft] > 0 because draft was sampled from q.
        if u * q[draft] < p[draft]:
            continue
        residual = (p - q).clamp(min=0)
        if residual.sum() <= 0:
            # Only rounding gets here: a rejection needs p(d) < q(d), so some other token has p > q.
            residual = p
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator))


def check_full_cache(cache, n_positions):
    """Raise ValueError unless every layer of `cache` can store n_positions positions."""
    short = [i for i, k in enumerate(cache.k) if k.size(2) < n_positions]
    if short:
        raise ValueError(
            f"lossless decoding stores every position in every layer, but layer {short[0]}'s KV cache has room for "
            f"only {cache.k[short[0]].size(2)} of the {n_positions} positions needed; "
            "allocate the cache with model.new_cache(1, n, drop=None)"
        )


def _draft(model, cache, drop, token, n_draft, temperature, top_k, top_p, generator, stop_ids):
    """Run up to n_draft LoRA steps from `token`; return the drafts and their distributions (or None)."""
    drafts, probs = [], []
    for _ in range(n_draft):
        logits = model.decode_step(torch.tensor([[token]], device=cache.k[0].device), cache, drop, refresh=False)
        if temperature == 0:
            token = int(logits.argmax(dim=-1))
        else:
            q = sampling_probs(logits, temperature, top_k, top_p)
            probs.append(q[0])
            token = int(torch.multinomial(q, 1, generator=generator))
        drafts.append(token)
        if token in stop_ids:
            break  # drafts after a stop token would be discarded
    return drafts, (torch.stack(probs) if probs else None)


@torch.no_grad()
def generate_lossless(model, prompt, max_new_tokens, drop, temperature=0.0, top_k=None, top_p=None,
                      generator=None, stop_ids=(), cache=None, stats=None, adaptive_drafts=False):
    """Yield new token ids (ints) for one prompt, drafting with LoRA steps and verifying with the full model.

    Greedy output equals `lora_drop.generate(model, prompt, ..., drop=None)`; sampled output
    follows the full model's distribution. Each cycle drafts drop.schedule.period - 1 tokens, or
    with adaptive_drafts=True between 0 and that many (see the module docstring).
    cache: optional, from model.new_cache with full capacity (drop=None) for
    len(prompt) + max_new_tokens positions. Afterwards it contains what plain decoding's cache
    contains. stats: an optional LosslessStats that receives the cycle counts.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if drop is None:
        raise ValueError("lossless decoding drafts with LoRA steps, so it needs a LoRADrop; got drop=None")
    idx = prompt_tensor(model, prompt)
    P = idx.size(1)
    # A verification pass may feed one token past the last one yielded: P + max_new_tokens positions.
    model.check_length(P + max_new_tokens)
    if cache is None:
        cache = model.new_cache(1, P + max_new_tokens, drop=None)
    check_full_cache(cache, P + max_new_tokens)
    stats = stats if stats is not None else LosslessStats()
    lengths = DraftLength(drop.schedule.period - 1) if adaptive_drafts else None

    logits = model.prefill(idx, cache, drop)  # every layer runs; the anchors sit at position P-1
    if temperature == 0:
        token = int(logits.argmax(dim=-1))
    else:
        token = int(torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator))
    n_emitted = 1
    yield token
    if token in stop_ids or n_emitted == max_new_tokens:
        return

    while True:
        n = cache.next_pos  # positions in the cache; `token` goes to position n
        n_draft = lengths.next() if lengths else drop.schedule.period - 1
        drafts, draft_probs = _draft(model, cache, drop, token, min(n_draft, max_new_tokens - n_emitted),
                                     temperature, top_k, top_p, generator, stop_ids)

        cache.truncate(n)
        chunk = {}
        fed = torch.tensor([[token] + drafts], device=idx.device)  # (1, m + 1)
        target_logits = model.extend(fed, cache, drop, chunk_anchors=chunk)[0]  # (m + 1, vocab)
        n_accepted, token = accept_drafts(drafts, draft_probs, target_logits, temperature, top_k, top_p, generator)
        stats.cycles += 1
        stats.drafted += len(drafts)
        stats.accepted += n_accepted
        if not drafts:
            stats.undrafted += 1
        if lengths:
            lengths.update(len(drafts), n_accepted)

        # Keep the fed token and the accepted drafts: positions n .. n + n_accepted.
        cache.truncate(n + 1 + n_accepted)
        cache.anchors = {i: (x[:, n_accepted : n_accepted + 1], out[:, n_accepted : n_accepted + 1])
                         for i, (x, out) in chunk.items()}
        cache.step = cache.next_pos - P

        for new in drafts[:n_accepted] + [token]:
            n_emitted += 1
            yield new
            if new in stop_ids or n_emitted == max_new_tokens:
                # Plain decoding never feeds its last token, so its cache ends one position earlier.
                cache.truncate(P + n_emitted - 1)
                return


# -----------------------------------------------------------------------------
# Prompt suite: lossless greedy against plain greedy on varied prompts

SUITE_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of Australia, and why is it not Sydney?",
    "List five fruits that are rich in vitamin C.",
    "Translate into French: The weather is nice today and I want to go for a walk.",
    "Write a short story about a robot that learns to paint.",
    "What is 17 multiplied by 23? Show your working.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "Give me three tips for writing clear emails at work.",
    "How does a refrigerator keep food cold?",
    "Write a haiku about autumn leaves.",
    "What are the main differences between a list and a tuple in Python?",
    "Describe the water cycle for a ten-year-old.",
    "Write a SQL query that counts the orders per customer in a table named orders.",
    "Why do we have leap years?",
    "Suggest a name for a bakery that sells only bread made with local grain.",
    "What causes the seasons on Earth?",
    "Explain what a hash table is and when to use one.",
    "Write a polite reply declining an invitation to a meeting on Friday.",
    "How many legs does a spider have, and how many does an insect have?",
    "Give a recipe for a simple tomato soup.",
    "What is photosynthesis?",
    "Write a bash command that finds all .txt files larger than 1 MB in the current directory.",
    "Compare trains and planes for a 500 km trip in a short paragraph.",
)


def _timed_decode(tokens_iter, sync):
    """Consume a token iterator; return (ids, decode seconds after the first token)."""
    ids = []
    t_first = None
    for token in tokens_iter:
        if t_first is None:
            sync()
            t_first = time.perf_counter()
        ids.append(token)
    sync()
    return ids, time.perf_counter() - t_first


def run_prompt_suite(model, tokenizer, drop, max_new_tokens=64, prompts=SUITE_PROMPTS, log=print, adaptive_drafts=False):
    """Decode every prompt greedily with the plain model and in lossless mode; return a summary dict.

    Both runs decode exactly max_new_tokens tokens (end-of-sequence is ignored) and are timed
    one after the other for each prompt, after one warm-up of each. The summary contains the
    lossless-to-plain ratio of decode tokens per second, over all prompts and as the per-prompt
    median. It also contains the acceptance rate, the mean tokens per cycle, and the number of
    prompts whose text differs from plain greedy decoding. That number should be 0, but
    rounding in the verification pass can flip a near-tie between two tokens.
    """
    if not prompts:
        raise ValueError("the prompt suite is empty; give at least one prompt")
    sync = torch.cuda.synchronize if model.tok_emb.weight.is_cuda else (lambda: None)

    def encode(text):
        return tokenizer.apply_chat_template(text) if tokenizer.has_chat_template else tokenizer.encode(text)

    warm = encode(prompts[0])
    list(generate(model, warm, min(8, max_new_tokens)))
    list(generate_lossless(model, warm, min(8, max_new_tokens), drop, adaptive_drafts=adaptive_drafts))

    total = LosslessStats()
    rows = []
    log(f"{'prompt':>6} {'plain tok/s':>12} {'lossless tok/s':>15} {'ratio':>6} {'accept':>7} {'tok/cycle':>10} {'same':>5}")
    for j, text in enumerate(prompts):
        prompt_ids = encode(text)
        plain_ids, plain_s = _timed_decode(generate(model, prompt_ids, max_new_tokens), sync)
        stats = LosslessStats()
        lossless_ids = generate_lossless(model, prompt_ids, max_new_tokens, drop, stats=stats, adaptive_drafts=adaptive_drafts)
        ids, lossless_s = _timed_decode(lossless_ids, sync)
        n_decode = max_new_tokens - 1
        row = {
            "prompt": text,
            "plain_tokens_per_s": n_decode / plain_s if n_decode else float("nan"),
            "lossless_tokens_per_s": n_decode / lossless_s if n_decode else float("nan"),
            "plain_s": plain_s,
            "lossless_s": lossless_s,
            **stats.summary(),
            "same_output": ids == plain_ids,
        }
        row["ratio"] = row["lossless_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
        total.cycles += stats.cycles
        total.drafted += stats.drafted
        total.accepted += stats.accepted
        total.undrafted += stats.undrafted
        log(f"{j:6d} {row['plain_tokens_per_s']:12.1f} {row['lossless_tokens_per_s']:15.1f} {row['ratio']:6.2f} "
            f"{row['acceptance_rate']:7.2f} {row['tokens_per_cycle']:10.2f} {'yes' if row['same_output'] else 'NO':>5}")

    summary = {
        "prompts": len(rows),
        "new_tokens": max_new_tokens,
        "period": drop.schedule.period,
        "adaptive_drafts": adaptive_drafts,
        "ratio_total": sum(r["plain_s"] for r in rows) / sum(r["lossless_s"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        **total.summary(),
        "different_outputs": sum(not r["same_output"] for r in rows),
        "rows": rows,
    }
    drafting = f", adaptive draft length: {total.undrafted} of {total.cycles} cycles without drafts" if adaptive_drafts else ""
    log(f"lossless / plain decode speed: {summary['ratio_total']:.2f}x over all prompts, "
        f"median {summary['ratio_median']:.2f}x; acceptance rate {summary['acceptance_rate']:.2f}, "
        f"{summary['tokens_per_cycle']:.2f} tokens per cycle (period {summary['period']}{drafting}); "
        f"{summary['different_outputs']} of {len(rows)} prompts gave text different from plain greedy")
    return summary
