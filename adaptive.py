"""
Adaptive refresh: choose refresh steps from the model's output, not from a fixed period.

    python generate.py --refresh adaptive --threshold 0.5 --max-interval 8
    python bench.py --adaptive-eval            # quality against fixed periods at equal refresh rates

Decode step j is a refresh step when either
- the logits that chose the token it feeds (step j-1's, or prefill's for j = 1) have a top-1
  probability at or below `threshold`, or
- `max_interval` steps have passed since the last refresh step (prefill counts as step 0).

The signal is the top-1 probability of the raw next-token distribution: the softmax of the
logits before temperature, top-k or top-p, so the schedule does not change with the sampling
settings. It is read after every step, LoRA steps, refresh steps and prefill alike. Threshold 1
therefore refreshes on every step, which is the plain model. Threshold 0 never fires, because
the top-1 probability is at least 1 / vocab_size, so that leaves the fixed period max_interval.

Why top-1 probability and not entropy:
- It lies in [1 / vocab_size, 1] for any vocabulary, so a threshold in [0, 1] means the same
  for every model. Entropy is measured in nats, and its range grows with log(vocab_size).
- It measures the margin that greedy decoding depends on. A LoRA step's approximation error
  changes the chosen token most easily where the top token has little probability, and a low
  top-1 probability after a refresh step marks a position where the next LoRA step is most
  at risk.
- It costs one softmax and one max over the logits. Entropy also weighs the long tail of
  unlikely tokens, which barely affects the chosen token.
NOTE: the signal measures the model's uncertainty, not the LoRA approximation's error itself.
A LoRA step that is confident and wrong does not trigger a refresh, but max_interval bounds
how long such an error can last.

KV cache: droppable layers store prompt and refresh positions only, as under a fixed period.
Refresh steps are not known in advance, so the cache is allocated for the worst case (every
step a refresh), and `cache.nbytes()` counts the positions actually stored.

Teacher-forced evaluation (`evaluate_adaptive`) decodes a given text step by step with these
decisions. It reports the KL divergence from the full model, top-1 agreement, perplexity and the
achieved refresh rate. `compare_with_fixed` sets these next to fixed periods at the same
refresh rate.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_drop import LoRADrop, Schedule, check_sampling, prompt_tensor, sample_next


@dataclass(frozen=True)
class AdaptiveRefresh:
    """The adaptive refresh rule: refresh when top-1 probability <= threshold, or after max_interval steps."""

    # NOTE: the default 0.5 is not tuned. On one SmolLM2-135M-Instruct reply the full model's top-1
    # probability was at or below 0.55 on about 10% of the steps; LoRA steps were not measured.
    threshold: float = 0.5  # top-1 probability at or below which the next step is a refresh step, in [0, 1]
    max_interval: int = 8  # maximum number of decode steps from one refresh step (or prefill) to the next, >= 1

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1:
            raise ValueError(
                f"invalid refresh threshold {self.threshold!r}: it must be a top-1 probability in [0, 1] "
                "(1 refreshes on every step, 0 leaves only the max-interval refreshes)"
            )
        if isinstance(self.max_interval, bool) or not isinstance(self.max_interval, int) or self.max_interval < 1:
            raise ValueError(
                f"invalid max interval {self.max_interval!r}: it must be an integer >= 1 "
                "(the maximum number of decode steps between two refresh steps)"
            )

    def signal_fires(self, logits):
        """True when any row of logits (B, vocab) has top-1 probability at or below the threshold."""
        top1 = logits.float().softmax(dim=-1).max(dim=-1).values
        return bool((top1 <= self.threshold).any())

    def next_is_refresh(self, logits, steps_since_refresh):
        """Decide whether the next decode step is a refresh step; return (refresh, reason).

        logits: the output of the last decode step, or of prefill. steps_since_refresh: decode
        steps run since the last refresh step or prefill, so the next step is number
        steps_since_refresh + 1 after it. reason is "signal", "max_interval" or None.
        """
        if self.signal_fires(logits):
            return True, "signal"
        if steps_since_refresh + 1 >= self.max_interval:
            return True, "max_interval"
        return False, None


@dataclass
class AdaptiveStats:
    """Counts of decode and refresh steps, summed over every call that is given the same object."""

    decode_steps: int = 0
    refresh_steps: int = 0
    signal_refreshes: int = 0  # refresh steps the signal chose (the rest came from max_interval)

    @property
    def refresh_rate(self):
        """Share of decode steps that were refresh steps."""
        return self.refresh_steps / self.decode_steps if self.decode_steps else float("nan")

    @property
    def mean_refresh_interval(self):
        """Decode steps per refresh step; a fixed period k gives about k."""
        return self.decode_steps / self.refresh_steps if self.refresh_steps else float("inf")

    def record(self, refresh, reason):
        self.decode_steps += 1
        self.refresh_steps += bool(refresh)
        self.signal_refreshes += reason == "signal"

    def summary(self):
        return {
            "decode_steps": self.decode_steps,
            "refresh_steps": self.refresh_steps,
            "signal_refreshes": self.signal_refreshes,
            "refresh_rate": self.refresh_rate,
            "mean_refresh_interval": self.mean_refresh_interval,
        }


@torch.no_grad()
def generate_adaptive(model, prompt, max_new_tokens, drop, policy, temperature=0.0, top_k=None, top_p=None,
                      generator=None, stop_ids=(), cache=None, stats=None):
    """Yield new token ids (ints) for one prompt, with refresh steps chosen by `policy` (an AdaptiveRefresh).

    Arguments as in `lora_drop.generate`. cache: optional, from model.new_cache with full
    capacity (drop=None), since any step may be a refresh step. stats: an optional
    AdaptiveStats that receives the step counts.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if drop is None:
        raise ValueError("adaptive refresh chooses between LoRA and refresh steps, so it needs a LoRADrop; got drop=None")
    if not isinstance(policy, AdaptiveRefresh):
        raise ValueError(f"policy must be an AdaptiveRefresh, got {type(policy).__name__}")
    idx = prompt_tensor(model, prompt)
    P = idx.size(1)
    model.check_length(P + max_new_tokens)
    if cache is None:
        cache = model.new_cache(1, P + max_new_tokens - 1, drop=None)
    stats = stats if stats is not None else AdaptiveStats()

    logits = model.prefill(idx, cache, drop)
    since_refresh = 0
    for n in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield int(token)
        if int(token) in stop_ids or n == max_new_tokens - 1:
            return
        refresh, reason = policy.next_is_refresh(logits, since_refresh)
        logits = model.decode_step(token, cache, drop, refresh=refresh)
        since_refresh = 0 if refresh else since_refresh + 1
        stats.record(refresh, reason)


# -----------------------------------------------------------------------------
# Teacher-forced evaluation


def _check_sequence(model, tokens, prompt_len):
    """Return tokens as a (B, T) long tensor on the model's device; raise ValueError when they cannot be evaluated."""
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=model.tok_emb.weight.device)
    if tokens.dim() == 1:
        tokens = tokens.view(1, -1)
    if tokens.dim() != 2:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}; give a list of ids or a (B, T) tensor")
    if not isinstance(prompt_len, int) or not 1 <= prompt_len <= tokens.size(1) - 2:
        raise ValueError(
            f"invalid prompt_len {prompt_len!r} for sequences of {tokens.size(1)} tokens: it must be an integer "
            "from 1 to T - 2, so that at least one decode step has a next token to predict"
        )
    bad = tokens[(tokens < 0) | (tokens >= model.config.vocab_size)]
    if bad.numel():
        raise ValueError(
            f"token id {int(bad[0])} is outside the vocabulary (ids 0..{model.config.vocab_size - 1}); "
            "encode the text with this model's tokenizer"
        )
    model.check_length(tokens.size(1))
    return tokens


@torch.no_grad()
def teacher_forced_logits(model, drop, tokens, prompt_len, policy):
    """Decode one given sequence step by step with adaptive refresh; return (logits, refresh flags).

    tokens: (1, T). Prefill runs on the first prompt_len tokens, then decode steps feed
    tokens[prompt_len .. T-2], each a refresh step or a LoRA step as `policy` decides from the
    previous output. Returns the logits (1, T - prompt_len, vocab) at positions prompt_len - 1
    .. T - 2 (prefill's, then each decode step's) and a bool list with one flag per decode step.
    """
    T = tokens.size(1)
    cache = model.new_cache(1, T - 1, drop=None)
    logits = model.prefill(tokens[:, :prompt_len], cache, drop)
    out, flags = [logits], []
    since_refresh = 0
    for t in range(prompt_len, T - 1):
        refresh, _ = policy.next_is_refresh(logits, since_refresh)
        logits = model.decode_step(tokens[:, t : t + 1], cache, drop, refresh=refresh)
        since_refresh = 0 if refresh else since_refresh + 1
        out.append(logits)
        flags.append(refresh)
    return torch.stack(out, dim=1), flags


def quality_metrics(logits, full_logits, targets):
    """Sums over positions: KL(full || scheduled) in nats, top-1 agreements and cross-entropy.

    logits, full_logits: (N, vocab) at the decode steps' positions; targets: (N,) next tokens.
    Returns sums, so that several sequences can be pooled before dividing by the step count.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    full_logp = F.log_softmax(full_logits.float(), dim=-1)
    kl = (full_logp.exp() * (full_logp - logp)).sum(dim=-1).clamp(min=0)  # below 0 only by rounding
    return {
        "kl_sum": float(kl.sum()),
        "agree_sum": int((logits.argmax(dim=-1) == full_logits.argmax(dim=-1)).sum()),
        "nll_sum": float(F.cross_entropy(logp, targets, reduction="sum")),
        "full_nll_sum": float(F.cross_entropy(full_logp, targets, reduction="sum")),
    }


def _finish(sums, steps, refresh_steps):
    return {
        "kl": sums["kl_sum"] / steps,
        "top1_agreement": sums["agree_sum"] / steps,
        "perplexity": math.exp(sums["nll_sum"] / steps),
        "full_perplexity": math.exp(sums["full_nll_sum"] / steps),
        "refresh_rate": refresh_steps / steps,
        "decode_steps": steps,
    }


def _pool(parts):
    return {k: sum(p[k] for p in parts) for k in parts[0]}


@torch.no_grad()
def evaluate_adaptive(model, drop, tokens, prompt_len, policy):
    """Measure the teacher-forced quality of adaptive refresh on tokens (B, T) or one list of ids.

    The metrics cover the decode steps that have a next token, T - prompt_len - 1 per row, and
    compare each step's output with the full model's at the same position. They are the mean KL
    divergence from the full model in nats, top-1 agreement, the perplexity of the given next
    tokens (and the full model's, for reference), and the refresh rate (refresh steps / decode steps).
    """
    tokens = _check_sequence(model, tokens, prompt_len)
    full = model(tokens)  # (B, T, vocab)
    parts, refresh_steps = [], 0
    for row in range(tokens.size(0)):
        logits, flags = teacher_forced_logits(model, drop, tokens[row : row + 1], prompt_len, policy)
        # Position prompt_len - 1 is prefill's output, exact by construction, so it is left out.
        parts.append(quality_metrics(logits[0, 1:], full[row, prompt_len:-1], tokens[row, prompt_len + 1 :]))
        refresh_steps += sum(flags)
    steps = tokens.size(0) * (tokens.size(1) - prompt_len - 1)
    return _finish(_pool(parts), steps, refresh_steps)


def with_period(model, drop, period):
    """Return a copy of `drop` with the same droppable layers and correctors and another refresh period."""
    schedule = Schedule.make(model.config.n_layer, list(drop.schedule.layers), period, drop.schedule.reuse)
    copy = LoRADrop(model.config, schedule, rank=drop.rank, alpha=drop.alpha)
    copy.load_state_dict(drop.state_dict())
    return copy.to(model.tok_emb.weight)


@torch.no_grad()
def evaluate_fixed(model, drop, tokens, prompt_len, period):
    """Measure the teacher-forced quality of a fixed refresh period, with the metrics of `evaluate_adaptive`.

    Uses `model.scheduled_forward`, which equals step-by-step decoding under the schedule.
    """
    tokens = _check_sequence(model, tokens, prompt_len)
    fixed = with_period(model, drop, period)
    logits = model.scheduled_forward(tokens, prompt_len, fixed)
    full = model(tokens)
    n = tokens.size(1) - prompt_len - 1
    parts = [
        quality_metrics(logits[row, prompt_len:-1], full[row, prompt_len:-1], tokens[row, prompt_len + 1 :])
        for row in range(tokens.size(0))
    ]
    refresh_steps = tokens.size(0) * (n // period)
    return _finish(_pool(parts), tokens.size(0) * n, refresh_steps)


def interpolate(rate, points):
    """Linear interpolation of (refresh rate, value) points at `rate`; None outside their range."""
    points = sorted(points)
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if r0 <= rate <= r1:
            return v0 if r1 == r0 else v0 + (v1 - v0) * (rate - r0) / (r1 - r0)
    return None


@torch.no_grad()
def compare_with_fixed(model, drop, tokens, prompt_len, thresholds, max_interval, periods=range(1, 17), log=print):
    """Evaluate adaptive refresh at each threshold and fixed periods on the same text; return a summary dict.

    Fixed periods give the refresh rates 1, 1/2, 1/3 and so on. So each adaptive result is
    compared with the fixed-period metrics linearly interpolated at its own refresh rate, and
    the adaptive rule is better where its KL divergence is lower than the interpolated one.
    """
    periods = sorted(set(periods))
    if not periods or periods[0] < 1:
        raise ValueError(f"invalid periods {periods}: give refresh periods >= 1")
    if not thresholds:
        raise ValueError("no thresholds given; give at least one top-1 probability in [0, 1]")
    policies = [AdaptiveRefresh(t, max_interval) for t in thresholds]  # validates before the slow part

    fixed = {k: evaluate_fixed(model, drop, tokens, prompt_len, k) for k in periods}
    log(f"{'fixed period':>14} {'refresh rate':>13} {'KL (nats)':>10} {'top-1 agree':>12} {'perplexity':>11}")
    for k, m in fixed.items():
        log(f"{k:14d} {m['refresh_rate']:13.3f} {m['kl']:10.4f} {m['top1_agreement']:12.3f} {m['perplexity']:11.2f}")

    rows = []
    log(f"{'threshold':>10} {'refresh rate':>13} {'KL (nats)':>10} {'fixed KL':>9} {'top-1 agree':>12} "
        f"{'fixed agree':>12} {'perplexity':>11} {'fixed ppl':>10}")
    for policy in policies:
        m = evaluate_adaptive(model, drop, tokens, prompt_len, policy)
        at_rate = {
            name: interpolate(m["refresh_rate"], [(f["refresh_rate"], f[name]) for f in fixed.values()])
            for name in ("kl", "top1_agreement", "perplexity")
        }
        rows.append({"threshold": policy.threshold, "max_interval": policy.max_interval, **m,
                     **{f"fixed_{name}": value for name, value in at_rate.items()}})
        formats = {"kl": ".4f", "top1_agreement": ".3f", "perplexity": ".2f"}
        fixed_text = {name: "n/a" if v is None else format(v, formats[name]) for name, v in at_rate.items()}
        log(f"{policy.threshold:10.3f} {m['refresh_rate']:13.3f} {m['kl']:10.4f} {fixed_text['kl']:>9} "
            f"{m['top1_agreement']:12.3f} {fixed_text['top1_agreement']:>12} {m['perplexity']:11.2f} "
            f"{fixed_text['perplexity']:>10}")
    log(f"full model perplexity {rows[0]['full_perplexity']:.2f}; 'fixed' columns: fixed periods interpolated "
        "at the adaptive rule's refresh rate (n/a: outside the periods evaluated)")
    return {"fixed": {str(k): v for k, v in fixed.items()}, "adaptive": rows}


def heldout_text(n_chars=20000):
    """Return about n_chars of English text from Python's bundled help topics (pydoc_data.topics).

    The correctors train on text the model generates itself, so this text is held out from
    training. Topics are taken in sorted order, so the text is the same on every run of the
    same Python version.
    """
    from pydoc_data.topics import topics

    parts, total = [], 0
    for name in sorted(topics):
        parts.append(topics[name])
        total += len(topics[name])
        if total >= n_chars:
            break
    return "\n\n".join(parts)[:n_chars]


def heldout_sequences(tokenizer, n_sequences, length, max_seq_len):
    """Cut the held-out text into n_sequences token sequences of `length` tokens, (n_sequences, length)."""
    if length > max_seq_len:
        raise ValueError(f"sequence length {length} is longer than the model's context of {max_seq_len} tokens")
    ids = tokenizer.encode(heldout_text(n_chars=8 * n_sequences * length))
    if len(ids) < n_sequences * length:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than the {n_sequences * length} requested")
    return torch.tensor(ids[: n_sequences * length]).view(n_sequences, length)
