"""
Helpers for the notebooks in notebooks/: run size, corrector loading, schedule pictures,
a layer-by-layer trace of one decode step, hidden-state drift measurements, and a reader
for the sweep results file.

    import notebook_utils as nu
    size = nu.notebook_size()                  # "full", or "ci" when LORA_DROP_NOTEBOOK_SIZE=ci
    drop, label = nu.load_drop(model)          # shipped trained correctors, else zero correctors
    logits, trace = nu.trace_decode_step(model, token, cache, drop)

The notebooks keep their cells short and call these functions; tests/test_notebook_utils.py
checks them on a tiny random model.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_drop import LoRADrop, Schedule, load_correctors

HERE = Path(__file__).resolve().parent
DEFAULT_CKPT = HERE / "checkpoints" / "smollm2-135m-instruct.safetensors"
DEFAULT_SWEEP = HERE / "results" / "sweep.json"
SIZE_ENV = "LORA_DROP_NOTEBOOK_SIZE"  # "ci" or "full"
SWEEP_ENV = "LORA_DROP_SWEEP_RESULTS"  # path of the sweep results file
NOTEBOOK_SIZES = ("ci", "full")
SWEEP_KEYS = ("period", "share", "speedup", "ideal_speedup", "ppl", "full_ppl", "top1", "kl", "kv_reduction")

# Codes of a schedule grid cell (schedule_grid), in the order of SCHEDULE_LABELS.
LORA, REFRESH, KEPT = 0, 1, 2
SCHEDULE_LABELS = (
    "droppable layer, LoRA step: reuse + corrector, no KV write",
    "droppable layer, prefill or refresh step: full layer, KV written",
    "kept layer: full layer, KV written",
)
SCHEDULE_COLORS = ("#f4d35e", "#5fa8d3", "#1b4965")


def notebook_size(default="full"):
    """Read the run size of the notebooks from $LORA_DROP_NOTEBOOK_SIZE: "ci" (small token counts) or "full"."""
    size = os.environ.get(SIZE_ENV, default).strip().lower() or default
    if size not in NOTEBOOK_SIZES:
        raise ValueError(f"invalid {SIZE_ENV}={size!r}: use 'ci' (small, for tests) or 'full' (the default)")
    return size


# -----------------------------------------------------------------------------
# Correctors and schedules


def load_drop(model, ckpt=DEFAULT_CKPT):
    """Return (LoRADrop, label): the trained correctors in `ckpt` when the file exists, else zero correctors.

    Zero correctors use the default schedule (every layer but the first and every fourth
    dropped, refresh period 8, reuse "state"), the one the shipped checkpoint is trained for.
    """
    ckpt = Path(ckpt)
    if ckpt.is_file():
        drop, _ = load_correctors(str(ckpt), model)
        return drop.eval(), f"trained correctors from {ckpt.name}"
    schedule = Schedule.make(model.config.n_layer)
    drop = LoRADrop(model.config, schedule).to(model.tok_emb.weight)
    return drop.eval(), f"zero correctors (no checkpoint at {ckpt})"


def with_schedule(model, drop, layers=None, period=None, reuse=None, zero=False):
    """Return a new LoRADrop with another schedule, keeping drop's trained correctors for layers it still drops.

    layers takes any rule Schedule.make accepts; None keeps drop's value, as do period and reuse.
    With zero=True every corrector starts at zero, whatever drop contains.
    """
    base = drop.schedule
    schedule = Schedule.make(
        model.config.n_layer,
        list(base.layers) if layers is None else layers,
        base.period if period is None else period,
        base.reuse if reuse is None else reuse,
    )
    copy = LoRADrop(model.config, schedule, rank=drop.rank, alpha=drop.alpha)
    if not zero:
        for name, corrector in copy.correctors.items():
            if name in drop.correctors:
                corrector.load_state_dict(drop.correctors[name].state_dict())
    return copy.to(model.tok_emb.weight).eval()


def schedule_grid(schedule, n_layer, n_steps):
    """Return an int array (n_layer, n_steps + 1) of cell codes: column 0 is prefill, column j is decode step j.

    Codes: KEPT for layers outside the droppable set, REFRESH where a droppable layer runs in
    full (prefill and refresh steps), LORA where it returns reuse + corrector and writes no KV.
    """
    grid = np.full((n_layer, n_steps + 1), KEPT, dtype=int)
    full = np.array([True] + [schedule.is_refresh(j) for j in range(1, n_steps + 1)])
    for i in schedule.layers:
        grid[i] = np.where(full, REFRESH, LORA)
    return grid


def plot_schedule(ax, schedule, n_layer, n_steps):
    """Draw the schedule as a grid of layers (rows) by decode steps (columns) on a matplotlib axis."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = schedule_grid(schedule, n_layer, n_steps)
    ax.imshow(grid, cmap=ListedColormap(SCHEDULE_COLORS), vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_steps + 1), ["prefill"] + [str(j) for j in range(1, n_steps + 1)], fontsize=7)
    ax.set_yticks(range(0, n_layer, 2))
    ax.set_xlabel("decode step j (refresh step when j % period == 0)")
    ax.set_ylabel("layer index")
    handles = [Patch(color=color, label=label) for color, label in zip(SCHEDULE_COLORS, SCHEDULE_LABELS)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, fontsize=8, frameon=False)


# -----------------------------------------------------------------------------
# Tracing one decode step


@torch.no_grad()
def trace_decode_step(model, token, cache, drop=None, refresh=None):
    """Run model.decode_step and record what every layer did; return (logits, list of one dict per layer).

    Every figure is for the last position of the first row. Each dict has these entries:
    - "layer", and "mode": "full" or "lora";
    - "kv_written": True when the layer appended keys and values to its cache;
    - "input_norm", "output_norm": L2 norms of the residual stream entering and leaving the layer;
    - "update_norm": the norm of output minus input;
    - "output": the residual stream leaving the layer, a float32 (n_embd,) tensor;
    - for LoRA layers only, "reuse_norm" and "corrector_norm": the norms of the two terms of the output.
    The trace uses forward hooks and a temporary wrapper around drop.skip, so the step runs
    the unmodified decoding code.
    """
    records = {}

    def record(layer, mode, x, out):
        x, out = x[0, -1].float(), out[0, -1].float()
        records[layer] = {"layer": layer, "mode": mode, "input_norm": x.norm().item(),
                          "output_norm": out.norm().item(), "update_norm": (out - x).norm().item(),
                          "output": out.clone()}

    def hook(layer):
        return lambda module, args, out: record(layer, "full", args[0], out)

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    if drop is not None:
        skip = drop.skip

        def traced_skip(layer, x, anchor_in, anchor_out):
            out = skip(layer, x, anchor_in, anchor_out)
            correction = drop.correctors[str(layer)](x)
            record(layer, "lora", x, out)
            records[layer]["corrector_norm"] = correction[0, -1].float().norm().item()
            records[layer]["reuse_norm"] = (out - correction)[0, -1].float().norm().item()
            return out

        drop.skip = traced_skip  # an instance attribute shadows the method until it is deleted below
    lengths = list(cache.lengths)
    try:
        logits = model.decode_step(token, cache, drop, refresh=refresh)
    finally:
        for handle in handles:
            handle.remove()
        if drop is not None:
            del drop.skip
    trace = [records[i] for i in range(model.config.n_layer)]
    for i, row in enumerate(trace):
        row["kv_written"] = cache.lengths[i] > lengths[i]
    return logits, trace


def relative_difference(trace, reference):
    """Per layer, ||output - reference output|| / ||reference output|| of two traces of the same step, an array (n_layer,)."""
    return np.array([(row["output"] - ref["output"]).norm().item() / ref["output"].norm().item()
                     for row, ref in zip(trace, reference)])


def kv_bytes_per_layer(cache):
    """Bytes of keys and values each layer of a KVCache stores now, a list of n_layer ints."""
    return [n * cache.bytes_per_position() for n in cache.lengths]


# -----------------------------------------------------------------------------
# Hidden-state drift


@torch.no_grad()
def layer_states(model, idx):
    """Return (inputs, outputs) of every layer of the full model on idx (B, T): two lists of n_layer (B, T, n_embd) tensors."""
    _, outputs = model.scheduled_forward(idx, idx.size(1), None, return_hidden=True)
    embedded = model.embed(idx, torch.arange(idx.size(1), device=idx.device))
    return [embedded] + outputs[:-1], outputs


def lagged_cosine(states, max_lag, first=1, center=False):
    """Mean cosine similarity between each position's vector and the one `lag` positions earlier.

    states: a list of (B, T, n_embd) tensors, one per layer. Returns an array (len(states),
    max_lag) whose column lag - 1 is for lag = 1..max_lag. Only positions t - lag >= first
    count, so the first positions (position 0 acts as an attention sink, with a residual
    stream hundreds of times larger in SmolLM2) are never the earlier vector. With center,
    each sequence's mean vector over positions >= first is subtracted first, which leaves
    only the part that differs from position to position.
    """
    out = np.zeros((len(states), max_lag))
    for i, h in enumerate(states):
        if center:
            h = h - h[:, first:].mean(dim=1, keepdim=True)
        for lag in range(1, max_lag + 1):
            later, earlier = h[:, first + lag :], h[:, first : h.size(1) - lag]
            out[i, lag - 1] = F.cosine_similarity(later.float(), earlier.float(), dim=-1).mean().item()
    return out


@torch.no_grad()
def reuse_errors(inputs, outputs, drop, max_distance, first=1):
    """Error of a droppable layer's LoRA-step output against its true output, in isolation.

    Every layer of drop.schedule.layers gets the full model's true input x_t at position t and
    an anchor `distance` positions earlier (distance = 1..max_distance), with the anchor's true
    input and output. It returns drop.skip's output (reuse + corrector) for that layer, and the
    error is ||skip - y_t|| / ||y_t - x_t||, the distance to the true output y_t relative to the
    size of the layer's own update. Reuse "none" with a zero corrector predicts x_t, so its error
    is exactly 1: below 1 beats plain layer skipping. Returns an array (len(layers), max_distance),
    the mean over positions; every distance is measured on the same positions t.
    """
    T = inputs[0].size(1)
    start = first + max_distance
    if start >= T:
        raise ValueError(f"sequences of {T} tokens are too short for distances up to {max_distance} after "
                         f"{first} skipped positions; use longer sequences or a smaller max_distance")
    errors = np.zeros((len(drop.schedule.layers), max_distance))
    for row, i in enumerate(drop.schedule.layers):
        x, y = inputs[i][:, start:], outputs[i][:, start:]
        update = (y - x).float().norm(dim=-1)
        for distance in range(1, max_distance + 1):
            anchor_in = inputs[i][:, start - distance : T - distance]
            anchor_out = outputs[i][:, start - distance : T - distance]
            predicted = drop.skip(i, x, anchor_in, anchor_out)
            error = (predicted - y).float().norm(dim=-1) / update
            errors[row, distance - 1] = error.mean().item()
    return errors


@torch.no_grad()
def residual_error_by_layer(model, idx, prompt_len, drop):
    """Relative error of the residual stream after each layer under the schedule, against the full model.

    At every decoded position t >= prompt_len, ||h_scheduled - h_full|| / ||h_full||; returns
    an array (n_layer,) of the means over positions and rows.
    """
    _, scheduled = model.scheduled_forward(idx, prompt_len, drop, return_hidden=True)
    _, full = model.scheduled_forward(idx, idx.size(1), None, return_hidden=True)
    out = np.zeros(len(full))
    for i, (h_s, h_f) in enumerate(zip(scheduled, full)):
        h_s, h_f = h_s[:, prompt_len:].float(), h_f[:, prompt_len:].float()
        out[i] = ((h_s - h_f).norm(dim=-1) / h_f.norm(dim=-1)).mean().item()
    return out


@torch.no_grad()
def kl_by_phase(model, idx, prompt_len, drop):
    """Mean KL(full model || schedule) in nats at decoded positions, grouped by decode step j mod period.

    Returns an array (period,) whose entry r is the mean over steps with j % period == r, so
    entry 0 is the refresh steps' mean. An entry with no such step is NaN.
    """
    period = drop.schedule.period
    logp = model.scheduled_forward(idx, prompt_len, drop).float().log_softmax(-1)[:, prompt_len:]
    full_logp = model(idx).float().log_softmax(-1)[:, prompt_len:]
    kl = (full_logp.exp() * (full_logp - logp)).sum(-1)  # (B, T - prompt_len)
    steps = torch.arange(1, kl.size(1) + 1)
    return np.array([kl[:, steps % period == r].mean().item() if (steps % period == r).any() else math.nan
                     for r in range(period)])


# -----------------------------------------------------------------------------
# Training text for a short live run

DOCSTRING_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading",
                     "unittest", "datetime", "decimal", "fractions", "heapq", "bisect", "textwrap", "string")


def stdlib_docstrings(n_chars=20000):
    """Return about n_chars of English text: docstrings of standard-library modules and their public members.

    The project's held-out evaluation text is pydoc_data.topics (the language reference), and
    this text is not part of it (no 80-character piece of the first 20,000 characters occurs
    there, checked on Python 3.11). The order is fixed, so the text is the same on every run
    of the same Python version.
    """
    import importlib
    import inspect

    parts, total = [], 0
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        members = [module] + [getattr(module, attr) for attr in sorted(getattr(module, "__all__", []))]
        for member in members:
            doc = inspect.getdoc(member)
            if doc and doc not in parts:
                parts.append(doc)
                total += len(doc)
            if total >= n_chars:
                return "\n\n".join(parts)[:n_chars]
    return "\n\n".join(parts)


# -----------------------------------------------------------------------------
# Sweep results


def sweep_path():
    """Path of the sweep results file: $LORA_DROP_SWEEP_RESULTS, else results/sweep.json in the repository."""
    return Path(os.environ.get(SWEEP_ENV) or DEFAULT_SWEEP)


def load_sweep(path=None):
    """Read the cells of a sweep results file; return (rows, message), one flat dict per cell.

    Accepted layouts: sweep.py's {"cells": {key: cell}}, or a list of cells, or {"cells": [...]}.
    A cell's entries may sit at its top level or inside its "quality" and "speed" objects (as
    sweep.py writes them), and they are merged into one flat dict. A cell is kept when it has
    a finite number for every key in SWEEP_KEYS. The share becomes a fraction where the file
    gives a percentage, and "ppl_ratio" (ppl / full_ppl) is added where it is missing. When
    the file is missing or unreadable, rows is empty and message gives the reason.
    """
    path = Path(path) if path is not None else sweep_path()
    if not path.is_file():
        return [], f"no sweep results at {path}: run sweep.py to write them, or set ${SWEEP_ENV} to another file"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [], f"the sweep results file {path} is not readable JSON ({err}); run sweep.py again"
    raw = data.get("cells") if isinstance(data, dict) else data
    if isinstance(raw, dict):
        raw = list(raw.values())
    if not isinstance(raw, list):
        return [], f"the sweep results file {path} contains no cells (expected a list, or an object with 'cells')"
    rows, skipped = [], 0
    for cell in raw:
        row = _flatten_cell(cell)
        if row is None:
            skipped += 1
            continue
        if row["share"] > 1:
            row["share"] = row["share"] / 100
        if not _is_number(row.get("ppl_ratio")):
            row["ppl_ratio"] = row["ppl"] / row["full_ppl"]
        rows.append(row)
    message = f"{len(rows)} sweep cells from {path}"
    if skipped:
        message += f"; {skipped} left out because they lack a number for one of {', '.join(SWEEP_KEYS)}"
    return rows, message


def _flatten_cell(cell):
    """Merge a cell's top level with its "quality" and "speed" objects; None when a key of SWEEP_KEYS is missing."""
    if not isinstance(cell, dict):
        return None
    row = {}
    for part in ("speed", "quality"):
        if isinstance(cell.get(part), dict):
            row.update(cell[part])
    row.update({key: value for key, value in cell.items() if not isinstance(value, dict)})
    return row if all(_is_number(row.get(key)) for key in SWEEP_KEYS) else None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
