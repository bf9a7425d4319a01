"""
LoRA-Drop (temporal LoRA decoding, arXiv 2601.02569) in one readable file.

A decoder-only transformer (GPT-2 or Llama layers) with a preallocated KV cache,
and the LoRA-Drop schedule on top of it:

- prefill runs every layer on the prompt;
- decode step j (the first token after the prompt is step 1) is a *refresh step*
  when j % period == 0, and then every layer runs;
- on every other step (a *LoRA step*) each *droppable* layer skips attention, MLP
  and its KV-cache write, and returns `reuse + corrector(x)`, where x is the
  residual stream entering the layer, `reuse` comes from the layer's last full run
  (its *anchor*), and the corrector is a small low-rank map trained by distillation.

Two paths compute the same thing and a test holds them equal:
- `GPT.prefill` + `GPT.decode_step`: the fast path, one token at a time with a KV cache;
- `GPT.scheduled_forward`: the reference path, all positions of a teacher-forced
  sequence at once; training and evaluation use it.

    from lora_drop import GPT, Config, Schedule, LoRADrop
    model = GPT(Config(arch="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=64))
    drop = LoRADrop(model.config, Schedule.make(model.config.n_layer))
    for token in generate(model, prompt_ids, max_new_tokens=32, drop=drop): ...
"""

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Model configuration


@dataclass
class Config:
    arch: str = "llama"  # "gpt2" (LayerNorm, GELU, learned positions, biases) or "llama" (RMSNorm, SwiGLU, RoPE)
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 means n_head
    n_embd: int = 64  # width of the residual stream
    hidden_dim: int = 0  # MLP inner width; 0 means 4 * n_embd
    max_seq_len: int = 256  # longest sequence the position tables cover
    norm_eps: float = 1e-5
    rope_base: float = 10000.0  # llama only
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    qkv_bias: bool = False  # Qwen2-style biases on the q/k/v projections (llama only; GPT-2 always has biases)

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown arch {self.arch!r}: use 'gpt2' or 'llama'")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.hidden_dim = self.hidden_dim or 4 * self.n_embd
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}, "
                f"and n_head by n_kv_head={self.n_kv_head}"
            )
        self.head_dim = self.n_embd // self.n_head


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even when the model runs in bfloat16, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim, max_len, base):
    """Return cos and sin tables, each (max_len, head_dim), for rotate-half RoPE."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (max_len, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, heads, T, head_dim); cos, sin: (T, head_dim) or (B, 1, T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.arch == "gpt2" or config.qkv_bias
        # One matrix for q, k and v: a decode step reads it with one matrix-vector product.
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.arch == "gpt2")

    def forward(self, x, rope, mask=None, kv=None):
        """Attend causally, or by `mask` (True = may attend), over x and any cached keys.

        rope: (cos, sin) rows for x's positions, or None (GPT-2).
        kv: a callable that stores this step's keys/values and returns all stored ones, plus
            the mask the new tokens need when they follow stored ones.
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            k, v, kv_mask = kv(k, v)  # (B, n_kv_head, stored, head_dim)
            mask = kv_mask if mask is None else mask
        # A single new token attends to everything stored, so it needs no mask.
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * head_dim)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.arch == "llama"
        bias = config.arch == "gpt2"
        # For SwiGLU, `up` stacks the gate and up projections as [gate; up].
        n_up = 2 * config.hidden_dim if self.swiglu else config.hidden_dim
        self.up = nn.Linear(config.n_embd, n_up, bias=bias)
        self.down = nn.Linear(config.hidden_dim, config.n_embd, bias=bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        Norm = nn.LayerNorm if config.arch == "gpt2" else RMSNorm
        self.attn_norm = Norm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = Norm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask=None, kv=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, kv)
        x = x + self.mlp(self.mlp_norm(x))
        return x


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values, one buffer per layer, each with its own length.

    A droppable layer writes only prompt and refresh positions, so its buffer can be
    shorter than the others: `capacity[i]` sets layer i's size. `positions[i]` lists
    the absolute positions layer i has stored, in order. The cache also stores the
    decoding state: the next position, the decode step, and each droppable layer's
    anchor (its input and output at the last position where it ran in full).
    """

    def __init__(self, config, batch_size, capacity, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_head, 0, config.head_dim)
        self.k = [torch.zeros(shape[:2] + (n,) + shape[3:], device=device, dtype=dtype) for n in capacity]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.lengths = [0] * config.n_layer
        self.positions = [[] for _ in range(config.n_layer)]
        self.next_pos = 0  # absolute position of the next token fed in
        self.step = 0  # decode steps run so far; prefill is step 0
        self.anchors = {}  # layer -> (input, output) at its anchor position, each (B, 1, n_embd)

    def writer(self, layer, pos):
        """Return a callable that appends keys/values at positions `pos` to `layer`."""

        def write(k, v):
            start, end = self.lengths[layer], self.lengths[layer] + k.size(2)
            if end > self.k[layer].size(2):
                raise RuntimeError(
                    f"KV cache for layer {layer} is full ({self.k[layer].size(2)} positions); "
                    "allocate it with a larger capacity"
                )
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
            self.lengths[layer] = end
            self.positions[layer].extend(range(pos, pos + k.size(2)))
            mask = None
            if k.size(2) > 1 and start > 0:
                # Several new tokens after stored ones: each may attend to stored positions up to its own.
                stored = torch.tensor(self.positions[layer], device=k.device)
                mask = stored[None, :] <= stored[-k.size(2) :, None]  # (T, stored)
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask

        return write

    def truncate(self, n_positions):
        """Forget every stored position >= n_positions, so decoding can resume from there.

        NOTE: `step` and the droppable layers' anchors are left as they are; a caller that
        resumes LoRA-Drop decoding after a truncate must set them (lossless.py does).
        """
        for layer, positions in enumerate(self.positions):
            keep = sum(p < n_positions for p in positions)
            del positions[keep:]
            self.lengths[layer] = keep
        self.next_pos = min(self.next_pos, n_positions)

    def bytes_per_position(self):
        k = self.k[0]
        return 2 * k.size(0) * k.size(1) * k.size(3) * k.element_size()

    def nbytes(self):
        """Bytes of keys and values stored now, over all layers."""
        return sum(self.lengths) * self.bytes_per_position()

    def full_nbytes(self):
        """Bytes a cache that stores every position in every layer would hold now."""
        return len(self.lengths) * self.next_pos * self.bytes_per_position()


# -----------------------------------------------------------------------------
# The LoRA-Drop schedule and corrector

REUSE_RULES = ("state", "delta", "none")


def default_droppable(n_layer):
    """Every layer but the first and every fourth, as in the published code (22 of 30)."""
    return tuple(i for i in range(n_layer) if i > 0 and i % 4 != 0)


def parse_layers(rule, n_layer):
    """Turn a droppable-set rule into layer indices.

    rule: None or "default"; a list or "1,2,5" (explicit indices); "stride:S" (keep layer 0
    and every S-th layer, drop the rest); "fraction:F" (drop round(F * n_layer) layers, keeping
    layer 0 and spreading the kept layers evenly).
    """
    if rule is None or rule == "default":
        return default_droppable(n_layer)
    if isinstance(rule, (list, tuple)):
        if not all(isinstance(i, int) for i in rule):
            raise ValueError(f"invalid droppable-layer list {rule!r}: give integer layer indices")
        return tuple(rule)
    rule = str(rule).strip()
    kind, _, value = rule.partition(":")
    try:
        if kind == "stride":
            stride = int(value)
            if stride < 1:
                raise ValueError
            return tuple(i for i in range(n_layer) if i > 0 and i % stride != 0)
        if kind == "fraction":
            share = float(value)
            if not 0 <= share < 1:
                raise ValueError
            n_keep = n_layer - round(share * n_layer)
            keep = {round(j * n_layer / n_keep) for j in range(n_keep)}
            return tuple(i for i in range(n_layer) if i not in keep)
        if rule == "":
            return ()
        return tuple(int(part) for part in rule.split(","))
    except ValueError:
        raise ValueError(
            f"invalid droppable-layer rule {rule!r}: use 'default', a list such as '1,2,3', "
            "'stride:S' with S >= 1, or 'fraction:F' with 0 <= F < 1"
        ) from None


@dataclass(frozen=True)
class Schedule:
    layers: tuple  # droppable layer indices, sorted
    period: int = 8  # refresh period k: decode step j is a refresh step when j % k == 0
    reuse: str = "state"  # "state": anchor output; "delta": x + anchor's residual update; "none": x

    @classmethod
    def make(cls, n_layer, layers=None, period=8, reuse="state"):
        """Build and validate a schedule; `layers` takes any rule `parse_layers` accepts."""
        schedule = cls(tuple(sorted(parse_layers(layers, n_layer))), period, reuse)
        schedule.validate(n_layer, layers)
        return schedule

    def validate(self, n_layer, rule=None):
        layers = list(self.layers)
        if not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"invalid refresh period {self.period!r}: it must be an integer >= 1")
        if self.reuse not in REUSE_RULES:
            raise ValueError(f"unknown reuse rule {self.reuse!r}: use one of {', '.join(REUSE_RULES)}")
        bad = [i for i in layers if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"droppable layer index {bad[0]} is out of range: the model has layers 0..{n_layer - 1}")
        if len(set(layers)) != len(layers):
            repeated = sorted({i for i in layers if layers.count(i) > 1})
            raise ValueError(f"droppable layer {repeated[0]} is listed more than once")
        if len(layers) == n_layer:
            raise ValueError(
                f"the droppable set {rule if rule is not None else layers} contains all {n_layer} layers, "
                "so no layer would compute the new token; keep at least one layer"
            )

    def is_refresh(self, step):
        return step % self.period == 0

    def full_positions(self, T, prompt_len, device=None):
        """(B, T) bool: positions where droppable layers run in full (prompt and refresh steps)."""
        t = torch.arange(T, device=device)
        step = t - prompt_len.view(-1, 1) + 1  # decode step of each position; <= 0 inside the prompt
        return (step <= 0) | (step % self.period == 0)

    def kv_entries(self, layer, prompt_len, n_steps):
        """KV entries layer `layer` stores after prefill of prompt_len tokens and n_steps decode steps."""
        if layer in self.layers:
            return prompt_len + n_steps // self.period
        return prompt_len + n_steps


class Corrector(nn.Module):
    """Low-rank map x -> B(A(x)) * alpha / rank, zero at initialisation (B = 0), as in LoRA."""

    def __init__(self, dim, rank=8, alpha=16.0):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"invalid corrector rank {rank!r}: it must be an integer >= 1")
        self.A = nn.Linear(dim, rank, bias=False)
        self.B = nn.Linear(rank, dim, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.B(self.A(x)) * self.scale


class LoRADrop(nn.Module):
    """The schedule plus one corrector per droppable layer: everything LoRA-Drop adds to a model."""

    def __init__(self, config, schedule, rank=8, alpha=16.0):
        super().__init__()
        schedule.validate(config.n_layer)
        self.schedule, self.rank, self.alpha = schedule, rank, alpha
        self.correctors = nn.ModuleDict({str(i): Corrector(config.n_embd, rank, alpha) for i in schedule.layers})

    def skip(self, layer, x, anchor_in, anchor_out):
        """Output of a droppable layer on a LoRA step: reuse + corrector(x)."""
        if self.schedule.reuse == "state":
            reuse = anchor_out.expand_as(x)
        elif self.schedule.reuse == "delta":
            reuse = x + (anchor_out - anchor_in)
        else:
            reuse = x
        return reuse + self.correctors[str(layer)](x)


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.arch == "gpt2":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps) if config.arch == "gpt2" else RMSNorm(
            config.n_embd, config.norm_eps
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.arch == "llama":
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.apply(self._column_major)
        if config.tie_embeddings:
            self.tok_emb.weight = self.lm_head.weight  # one matrix: the embedding and the output head

    @staticmethod
    def _column_major(module):
        # Keep each (out, in) weight's shape but store it column-major, i.e. as a contiguous
        # (in, out) matrix. A decode step is a vector-matrix product per weight, and on the x86
        # CPUs we measured, PyTorch's float32 product reads this layout about 1.5-2x faster
        # (bench.py prints the resulting weight-read GB/s). Loading with copy_ keeps the layout.
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().t().contiguous().t())

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx, pos):
        """Token (+ learned position) embeddings; pos: (T,) or (B, T) absolute positions."""
        x = self.tok_emb(idx)
        if self.config.arch == "gpt2":
            x = x + self.pos_emb(pos)
        return x

    def rope(self, pos):
        if self.config.arch != "llama":
            return None
        return self.rope_cos[pos], self.rope_sin[pos]

    def head(self, x):
        return self.lm_head(self.norm(x))

    def check_length(self, n_tokens):
        if n_tokens > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {n_tokens} tokens is longer than the model's context of "
                f"{self.config.max_seq_len} tokens; shorten the prompt or lower max_new_tokens"
            )

    # -- reference path: whole sequence, no cache --------------------------------

    def forward(self, idx):
        """Logits (B, T, vocab) of the plain model for every position, causal attention."""
        T = idx.size(1)
        self.check_length(T)
        pos = torch.arange(T, device=idx.device)
        x = self.embed(idx, pos)
        rope = self.rope(pos)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(x)

    def scheduled_forward(self, idx, prompt_len, drop=None, return_hidden=False):
        """Logits (B, T, vocab) that LoRA-Drop decoding produces for a teacher-forced sequence.

        Equals prefill on idx[:, :prompt_len] followed by decode steps feeding idx[:, prompt_len:]
        one at a time. prompt_len: int, or a (B,) tensor for a different prompt length per row.
        Each droppable layer runs in full with attention restricted to prompt and refresh
        positions (the positions its KV cache holds), then every LoRA position takes
        reuse + corrector(x) from its anchor, the last full position before it.
        With return_hidden, also returns the residual stream after each layer: a list of
        n_layer tensors (B, T, n_embd).
        """
        B, T = idx.shape
        self.check_length(T)
        device = idx.device
        pos = torch.arange(T, device=device)
        prompt_len = torch.as_tensor(prompt_len, device=device).expand(B)
        if int(prompt_len.min()) < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len.tolist()}")
        rope = self.rope(pos)
        x = self.embed(idx, pos)
        hidden = []
        if drop is not None:
            full = drop.schedule.full_positions(T, prompt_len, device)  # (B, T)
            # anchor[b, t]: the last full position at or before t (for a LoRA position, before t).
            anchor = torch.where(full, pos, 0).cummax(dim=1).values  # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            full_mask = (causal & full[:, None, :])[:, None]  # (B, 1, T, T): keys only at full positions
            gather_idx = anchor[..., None].expand(B, T, self.config.n_embd)
        for i, block in enumerate(self.blocks):
            if drop is not None and i in drop.schedule.layers:
                y = block(x, rope, mask=full_mask)
                skipped = drop.skip(i, x, x.gather(1, gather_idx), y.gather(1, gather_idx))
                x = torch.where(full[..., None], y, skipped)
            else:
                x = block(x, rope)
            if return_hidden:
                hidden.append(x)
        logits = self.head(x)
        return (logits, hidden) if return_hidden else logits

    # -- fast path: prefill, then one token per decode step -----------------------

    def new_cache(self, batch_size, max_tokens, drop=None, prompt_len=None):
        """Allocate a KV cache for up to max_tokens positions; droppable layers get only what they need."""
        self.check_length(max_tokens)
        capacity = [max_tokens] * self.config.n_layer
        if drop is not None and prompt_len is not None:
            for i in drop.schedule.layers:
                capacity[i] = drop.schedule.kv_entries(i, prompt_len, max_tokens - prompt_len)
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, capacity, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def prefill(self, idx, cache, drop=None):
        """Run every layer on the prompt idx (B, P), fill the cache; return last-position logits (B, vocab)."""
        if cache.next_pos != 0:
            raise RuntimeError("prefill needs an empty cache; allocate a new one with new_cache()")
        return self.head(self._run_layers(idx, cache, drop, lora_step=False)[:, -1])

    @torch.no_grad()
    def decode_step(self, token, cache, drop=None, refresh=None):
        """Feed one token per row, token (B, 1); return the next-token logits (B, vocab).

        refresh: None lets the schedule decide; True or False forces a refresh or a LoRA step
        (adaptive refresh decides from the previous step's output).
        """
        if cache.next_pos == 0:
            raise RuntimeError("decode_step needs a prefilled cache; call prefill() on the prompt first")
        cache.step += 1
        if refresh is None:
            refresh = drop is None or drop.schedule.is_refresh(cache.step)
        lora_step = drop is not None and not refresh
        return self.head(self._run_layers(token, cache, drop, lora_step)[:, -1])

    @torch.no_grad()
    def extend(self, idx, cache, drop=None, chunk_anchors=None):
        """Run every layer on idx (B, T) after the cached positions; return logits (B, T, vocab).

        Verifying several drafted tokens in one pass uses this. It does not count decode steps.
        chunk_anchors: a dict that, when given, receives each droppable layer's input and output
        at every position of idx, each (B, T, n_embd), so that a caller can move the anchors to
        a position inside the chunk (lossless.py keeps only the accepted drafts).
        """
        return self.head(self._run_layers(idx, cache, drop, lora_step=False, chunk_anchors=chunk_anchors))

    def _run_layers(self, idx, cache, drop, lora_step, chunk_anchors=None):
        """Run the blocks on idx (B, T) at the cache's next positions; return the final residual stream."""
        T = idx.size(1)
        start = cache.next_pos
        self.check_length(start + T)
        pos = torch.arange(start, start + T, device=idx.device)
        rope = None if self.config.arch != "llama" else (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.embed(idx, pos)
        droppable = drop.schedule.layers if drop is not None else ()
        for i, block in enumerate(self.blocks):
            if i not in droppable:
                x = block(x, rope, kv=cache.writer(i, start))
            elif lora_step:
                x = drop.skip(i, x, *cache.anchors[i])
            else:
                out = block(x, rope, kv=cache.writer(i, start))
                cache.anchors[i] = (x[:, -1:], out[:, -1:])
                if chunk_anchors is not None:
                    chunk_anchors[i] = (x, out)
                x = out
        cache.next_pos += T
        return x


# -----------------------------------------------------------------------------
# Generation


def sampling_probs(logits, temperature, top_k=None, top_p=None):
    """Return the distribution (B, vocab) to sample from: logits / temperature, then top-k, then top-p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        remove = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return logits.softmax(dim=-1)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick the next token (B, 1) from logits (B, vocab): greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator)


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"invalid max_new_tokens {max_new_tokens!r}: it must be an integer >= 1")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"invalid temperature {temperature}: it must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"invalid top_k {top_k}: it must be >= 1, or unset")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"invalid top_p {top_p}: it must be in (0, 1], or unset")


def prompt_tensor(model, prompt):
    """Return the prompt (list of ids or (1, P) tensor) as a (1, P) long tensor on the model's device.

    Raises ValueError for an empty prompt, several prompts, or ids outside the vocabulary.
    """
    idx = torch.as_tensor(prompt, dtype=torch.long, device=model.tok_emb.weight.device)
    if idx.dim() > 2 or (idx.dim() == 2 and idx.size(0) != 1):
        raise ValueError(f"the prompt has shape {tuple(idx.shape)}; give one prompt, a list of ids or a (1, P) tensor")
    idx = idx.view(1, -1)
    if idx.size(1) < 1:
        raise ValueError("the prompt is empty; give at least one token")
    bad = idx[(idx < 0) | (idx >= model.config.vocab_size)]
    if bad.numel():
        raise ValueError(
            f"prompt token id {int(bad[0])} is outside the vocabulary (ids 0..{model.config.vocab_size - 1}); "
            "encode the prompt with this model's tokenizer"
        )
    return idx


@torch.no_grad()
def generate(model, prompt, max_new_tokens, drop=None, temperature=0.0, top_k=None, top_p=None,
             generator=None, stop_ids=(), cache=None):
    """Yield new token ids (ints) one at a time for a single prompt (list of ids or (1, P) tensor).

    Stops after max_new_tokens or on a token in stop_ids (which is yielded). Pass `cache`
    (from model.new_cache) to inspect the KV cache afterwards.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    idx = prompt_tensor(model, prompt)
    # The last generated token is never fed back, so the cache needs P + max_new_tokens - 1 slots.
    n_total = idx.size(1) + max_new_tokens
    model.check_length(n_total)
    if cache is None:
        cache = model.new_cache(1, n_total - 1, drop, idx.size(1))
    logits = model.prefill(idx, cache, drop)
    for n in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield int(token)
        if int(token) in stop_ids or n == max_new_tokens - 1:
            return
        logits = model.decode_step(token, cache, drop)


# -----------------------------------------------------------------------------
# Corrector checkpoints


def weights_fingerprint(model):
    """Short hash of the base model's weights, to match correctors to the model they were trained for.

    Hashes every tensor's name and shape and a strided sample of up to 4096 of its values
    rounded to bfloat16, so the same weights loaded in float32 or bfloat16 hash alike.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_correctors(path, drop, model, model_name=""):
    """Write the correctors, schedule and base-model fingerprint to a safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in drop.correctors.state_dict().items()}
    meta = {
        "format": "lora-drop-correctors/1",
        "schedule": json.dumps(asdict(drop.schedule)),
        "rank": str(drop.rank),
        "alpha": str(drop.alpha),
        "n_layer": str(model.config.n_layer),
        "n_embd": str(model.config.n_embd),
        "base_model": model_name,
        "base_fingerprint": weights_fingerprint(model),
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600); a checkpoint is meant to be shared
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_correctors(path, model, device=None):
    """Read a corrector checkpoint for `model`; return (LoRADrop, metadata dict).

    Raises ValueError when the file is not a complete corrector checkpoint, or was
    trained for another base model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"corrector checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable corrector checkpoint (truncated or corrupt?): {err}") from None
    if meta.get("format") != "lora-drop-correctors/1":
        raise ValueError(f"{path} is not a lora-drop corrector checkpoint (no 'format' entry in its metadata)")
    missing = [key for key in ("schedule", "rank", "alpha", "base_fingerprint") if key not in meta]
    if missing:
        raise ValueError(f"{path} is missing the metadata entries {', '.join(missing)}; save it again with save_correctors()")
    expected = weights_fingerprint(model)
    if meta["base_fingerprint"] != expected:
        raise ValueError(
            f"{path} was trained for another base model ({meta.get('base_model') or 'unnamed'}, "
            f"fingerprint {meta['base_fingerprint']}); the loaded model's fingerprint is {expected}. "
            "Use correctors trained for this model, or train them with train_correctors.py"
        )
    schedule = Schedule(**{**json.loads(meta["schedule"]), "layers": tuple(json.loads(meta["schedule"])["layers"])})
    drop = LoRADrop(model.config, schedule, rank=int(meta["rank"]), alpha=float(meta["alpha"]))
    try:
        drop.correctors.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: the corrector tensors do not match its metadata (rank {meta['rank']}, layers {list(schedule.layers)}): {err}"
        ) from None
    p = model.tok_emb.weight
    return drop.to(device or p.device, p.dtype), meta
