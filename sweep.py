"""
Quality of LoRA-Drop decoding on real text, and a sweep of schedules in search of a safe zone.

    python bench.py --quality                        # quality table at the shipped checkpoint's schedule
    python bench.py --quality --data notes.jsonl --eval-sequences 32 --json
    python sweep.py                                  # train, evaluate and time 12 schedules; resumes where it stopped
    python sweep.py --report                         # print the table and the verdict from results/sweep.json only
    python sweep.py --periods 4,8 --shares 0.5 --steps 60
    python sweep.py --train-args "--lr 3e-3 --rank 16" --force

Quality is measured teacher-forced with train_correctors.evaluate, which runs
`model.scheduled_forward`: by construction it gives the logits that prefill plus
step-by-step LoRA-Drop decoding would give. Each held-out window of --eval-length tokens
is prefilled up to its prompt length, and every later position is a decode step that is
scored: perplexity of the text's next tokens, top-1 agreement with the full model, and
KL(full model || LoRA-Drop) in nats per token. The default text is Python's own help
topics (`pydoc_data.topics`, shipped with Python), so everything runs offline. The
correctors train on text the model generates itself, so this text is held out from them.
--data FILE measures on a UTF-8 plain text or JSON lines file instead.

The sweep crosses refresh periods (--periods) with shares of droppable layers (--shares,
the layers rule `fraction:F`). For each cell it trains correctors with
train_correctors.train for --steps steps on the cached self-generated data, measures
quality on the held-out text, and times greedy decoding against plain decoding in the
same process (interleaved, after a warm-up, median of --speed-repeats runs). Each
finished cell goes to --out (results/sweep.json), written atomically, together with the
settings it ran with, and its correctors to a folder next to it (results/sweep/). A rerun
skips every cell whose settings are unchanged, so an interrupted sweep resumes with the
next cell; --force runs every cell again. The report names the fastest schedule whose
perplexity is within --max-ppl-ratio of the full model's while it decodes at least
--min-speedup times faster, or says that none does and lists the quality-speed frontier.

Progress, tables and the verdict go to stderr. With --json the last stdout line is one
JSON object with every cell and the verdict.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

import bench
import generate as gen
import lora_drop
import train_correctors as tc
from lora_drop import LoRADrop, Schedule

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "sweep.json")
RESULTS_FORMAT = "lora-drop-sweep/1"

DEFAULT_PERIODS = (2, 4, 8, 16)
DEFAULT_SHARES = (0.25, 0.5, 0.75)
# NOTE: 30 steps is far from a converged corrector (train_correctors defaults to 200). For
# SmolLM2-135M on an idle 2-core CPU a cell is estimated at about 3.5 minutes: 30 steps of about
# 4.4 s, a minute of held-out evaluation and 10 s of timing, from separate runs and not measured
# end to end. The 12 cells then take about 40 minutes; --steps 20 --eval-sequences 8 brings that near 30.
DEFAULT_STEPS = 30
EVAL_SEQUENCES = 16  # held-out windows
EVAL_LENGTH = 256  # tokens per held-out window; the default prompt lengths are 64, 85, 107 and 128
EVAL_BATCH_SIZE = 4
SPEED_TOKENS = 64  # greedy tokens per timed run
SPEED_REPEATS = 2
# The safe zone: perplexity at most 5% above the full model's, with decoding at least 1.5x faster.
MAX_PPL_RATIO = 1.05
MIN_SPEEDUP = 1.5
# A measured speedup above this multiple of the ideal one is flagged in the report. Skipping a layer
# also skips its attention over the KV cache, which the ideal (weight bytes only) leaves out, but with
# short prompts that is small, so a larger excess suggests that other work slowed the plain runs.
SUSPECT_SPEEDUP_EXCESS = 1.1
# train_correctors evaluates on held-out self-generated text before and after training. The
# sweep measures quality on its own held-out text, so that evaluation is kept small.
TRAIN_EVAL_SEQUENCES = 4
# train_correctors options that the sweep sets itself, so --train-args must not contain them.
SWEEP_TRAIN_OPTIONS = ("period", "layers", "steps", "out", "resume", "model", "device", "dtype", "cache_dir", "json")


def log(msg=""):
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Held-out text


def default_text():
    """Return Python's bundled help topics (pydoc_data.topics) joined in sorted order.

    In Python 3.11 that is 79 topics, about 465,000 characters of English and code.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def check_data_file(path):
    """Raise FileNotFoundError unless the --data file exists, so that a typo fails before the model loads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}; check --data")


def read_text(path):
    """Return the text of a UTF-8 file: the whole file, or the "text" fields of its JSON lines joined by blank lines.

    train_correctors.read_documents parses the file, so --data accepts the same formats there and here.
    """
    check_data_file(path)
    with open(path, "rb") as f:
        if not f.read().strip():
            raise ValueError(f"text file {path} is empty; give a plain text or JSON lines file with text in it")
    return "\n\n".join(tc.read_documents(path))


@dataclass
class HeldOut:
    """Token windows of held-out text and the prompt lengths they are evaluated with."""

    windows: torch.Tensor  # (n_sequences, length + 1): inputs plus next-token targets
    prompt_lens: list  # cycled over the rows of each batch
    source: str  # "pydoc_data.topics" or the --data path

    def batches(self):
        return list(self.windows.split(EVAL_BATCH_SIZE))

    def fingerprint(self):
        return tc.data_fingerprint(self.windows)

    def describe(self):
        n, length = self.windows.size(0), self.windows.size(1) - 1
        return f"{n} windows of {length} tokens from {self.source}, prompt lengths {self.prompt_lens}"


def check_eval_sizes(n_sequences, length, prompt_len=None, max_seq_len=None):
    """Raise ValueError naming the first evaluation size that is invalid."""
    if n_sequences < 1:
        raise ValueError(f"invalid --eval-sequences {n_sequences}: it must be an integer >= 1")
    if length < 2:
        raise ValueError(f"invalid --eval-length {length}: it must be at least 2 tokens")
    if max_seq_len is not None and length > max_seq_len:
        raise ValueError(f"--eval-length {length} is longer than the model's context of {max_seq_len} tokens; lower it")
    if prompt_len is not None and not 1 <= prompt_len <= length - 1:
        raise ValueError(f"invalid --eval-prompt-len {prompt_len}: it must be from 1 to --eval-length - 1 ({length - 1}), "
                         "so that at least one position is a decode step")


def load_held_out(tokenizer, vocab_size, data=None, n_sequences=EVAL_SEQUENCES, length=EVAL_LENGTH, prompt_len=None):
    """Cut n_sequences windows of length + 1 tokens from --data (or the default text), evenly spaced over it.

    prompt_len: one prompt length for every window, or None for four lengths from a quarter
    to half of the window (train_correctors.evaluation_prompt_lens), cycled over the windows.
    """
    check_eval_sizes(n_sequences, length, prompt_len)
    source = "pydoc_data.topics" if data is None else str(data)
    text = default_text() if data is None else read_text(data)
    ids = tokenizer.encode(text)
    available = len(ids) // (length + 1)
    if available < n_sequences:
        raise ValueError(
            f"{source} has {len(ids)} tokens, fewer than the {n_sequences * (length + 1)} needed for --eval-sequences "
            f"{n_sequences} windows of --eval-length {length} tokens plus a target; give more text or lower either option"
        )
    windows = torch.tensor(ids[: available * (length + 1)], dtype=torch.long).view(available, length + 1)
    windows = windows[[i * available // n_sequences for i in range(n_sequences)]]  # evenly spaced over the text
    if int(windows.max()) >= vocab_size:
        raise ValueError(f"the tokenizer produced id {int(windows.max())}, outside the model's vocabulary of "
                         f"{vocab_size}; use the model's own tokenizer")
    prompt_lens = [prompt_len] if prompt_len is not None else tc.evaluation_prompt_lens(length)
    return HeldOut(windows, prompt_lens, source)


# -----------------------------------------------------------------------------
# Quality table

ROW_LABELS = {
    "full_model": "full model",
    "plain_skipping": "plain skipping (reuse none, zero correctors)",
    "zero_correctors": "zero correctors (reuse {reuse})",
    "trained": "trained correctors",
}


def quality_drops(model, schedule, trained=None):
    """Return the decodings the quality table compares: name -> LoRADrop, or None for the full model.

    The baselines use the droppable layers and refresh period of `schedule`. The trained row is
    included only when `trained` (a LoRADrop with trained correctors) is given.
    """
    p = model.tok_emb.weight
    drops = {
        "full_model": None,
        "plain_skipping": LoRADrop(model.config, Schedule(schedule.layers, schedule.period, "none")).to(p.device, p.dtype),
        "zero_correctors": LoRADrop(model.config, schedule).to(p.device, p.dtype),
    }
    if trained is not None:
        drops["trained"] = trained
    return drops


def quality_table(model, drops, held_out):
    """Evaluate each decoding in `drops` on the held-out windows; return name -> metrics of train_correctors.evaluate.

    Uses train_correctors.evaluate_many, the function behind train_correctors.evaluate, so the
    full model runs once per batch for all rows. The full-model row runs scheduled_forward
    without a schedule, so its KL is 0 and its top-1 agreement 100%.
    """
    return tc.evaluate_many(model, drops, held_out.batches(), held_out.prompt_lens)


def format_quality_table(rows, reuse="state"):
    """Return the quality table as markdown, one row per decoding."""
    lines = ["| decoding | perplexity | top-1 agreement | KL (nats/token) |", "|---|---:|---:|---:|"]
    for name, m in rows.items():
        label = ROW_LABELS.get(name, name).format(reuse=reuse)
        lines.append(f"| {label} | {m['ppl']:.3f} | {100 * m['top1']:.1f}% | {m['kl']:.4f} |")
    return "\n".join(lines)


def run_quality(model, tokenizer, schedule, trained=None, source="", data=None, n_sequences=EVAL_SEQUENCES,
                length=EVAL_LENGTH, prompt_len=None, log=log):
    """Measure the quality table on held-out text, print it to `log` as markdown, and return it as a dict."""
    check_eval_sizes(n_sequences, length, prompt_len, model.config.max_seq_len)
    held_out = load_held_out(tokenizer, model.config.vocab_size, data, n_sequences, length, prompt_len)
    model.eval()
    n_layer = model.config.n_layer
    log(f"quality on {held_out.describe()}; {len(schedule.layers)} of {n_layer} layers droppable, "
        f"period {schedule.period}{f', {source}' if source else ''}")
    if trained is None:
        log("note: no corrector checkpoint, so the table has no trained-correctors row; pass --ckpt")
    t0 = time.perf_counter()
    rows = quality_table(model, quality_drops(model, schedule, trained), held_out)
    log(format_quality_table(rows, schedule.reuse))
    log(f"{rows['full_model']['tokens']} decoded positions scored in {time.perf_counter() - t0:.1f} s")
    return {
        "schedule": {"layers": list(schedule.layers), "period": schedule.period, "reuse": schedule.reuse, "source": source},
        "eval": {"data": held_out.source, "sequences": held_out.windows.size(0), "length": held_out.windows.size(1) - 1,
                 "prompt_lens": held_out.prompt_lens, "tokens": rows["full_model"]["tokens"]},
        "rows": rows,
    }


# -----------------------------------------------------------------------------
# The sweep grid and per-cell settings


def parse_periods(text):
    """Parse "2,4,8" into refresh periods, each an integer >= 1, without repeats."""
    periods = []
    for part in str(text).split(","):
        try:
            period = int(part.strip())
        except ValueError:
            raise ValueError(f"invalid refresh period {part.strip()!r} in --periods: give integers >= 1 separated by commas") from None
        if period < 1:
            raise ValueError(f"invalid refresh period {period} in --periods: it must be an integer >= 1")
        if period not in periods:
            periods.append(period)
    return periods


def parse_shares(text):
    """Parse "0.25,0.5" into droppable shares, each a fraction strictly between 0 and 1, without repeats."""
    shares = []
    for part in str(text).split(","):
        try:
            share = float(part.strip())
        except ValueError:
            raise ValueError(f"invalid droppable share {part.strip()!r} in --shares: give fractions such as 0.5 "
                             "separated by commas") from None
        if not 0 < share < 1:
            raise ValueError(f"invalid droppable share {share} in --shares: it must be a fraction between 0 and 1, "
                             "exclusive, such as 0.5; at 0 no layer is dropped, at 1 no layer computes the new token")
        if share not in shares:
            shares.append(share)
    return shares


def cell_key(period, share):
    return f"period={period},share={share:g}"


def cell_checkpoint(out, period, share):
    """Path of a cell's corrector checkpoint: results/sweep.json -> results/sweep/period8-share0.5.safetensors."""
    return os.path.join(os.path.splitext(out)[0], f"period{period}-share{share:g}.safetensors")


def training_parser():
    p = tc.build_parser()
    p.prog = "sweep.py --train-args"
    return p


def parse_train_args(text):
    """Split --train-args into train_correctors options; raise ValueError for one the sweep sets itself."""
    try:
        argv = shlex.split(text or "")
    except ValueError as err:
        raise ValueError(f"invalid --train-args {text!r}: {err}") from None
    p = training_parser()
    unset = object()
    p.set_defaults(**{key: unset for key in SWEEP_TRAIN_OPTIONS})
    namespace, unknown = p.parse_known_args(argv)
    if unknown:
        raise ValueError(f"invalid --train-args {text!r}: train_correctors.py has no option {unknown[0]!r}")
    conflicting = [key for key in SWEEP_TRAIN_OPTIONS if getattr(namespace, key) is not unset]
    if conflicting:
        option = "--" + conflicting[0].replace("_", "-")
        raise ValueError(f"--train-args sets {option}, which the sweep sets itself for each cell; remove it, and use "
                         "sweep.py's --periods, --shares, --steps, --out, --model, --device, --dtype or --cache-dir instead")
    return argv


def cell_training_args(options, period, share):
    """Return the train_correctors arguments (an argparse.Namespace) of one cell."""
    argv = ["--eval-every", "0", "--save-every", "0", "--eval-sequences", str(TRAIN_EVAL_SEQUENCES),
            *parse_train_args(options.train_args),
            "--period", str(period), "--layers", f"fraction:{share:g}", "--steps", str(options.steps),
            "--out", cell_checkpoint(options.out, period, share), "--dtype", options.dtype]
    if options.model is not None:
        argv += ["--model", options.model]
    if options.cache_dir is not None:
        argv += ["--cache-dir", options.cache_dir]
    args = training_parser().parse_args(argv)
    tc.check_args(args)
    return args


def training_data_fingerprint(model, tokenizer, args):
    """Hash of the training windows that train_correctors reads for args (self-generated data is loaded from its cache)."""
    return tc.data_fingerprint(tc.load_windows(model, tokenizer, args, lambda msg: None)[0])


def cell_settings(args, model, train_data, held_out, options):
    """Everything that determines a cell's results, in the form it takes after a JSON round trip.

    train_data: the training_data_fingerprint of the cell's training windows.
    """
    p = model.tok_emb.weight
    settings = {
        "train": {key: getattr(args, key) for key in tc.RESUME_KEYS + ("steps",)},
        "train_data": train_data,
        "model_fingerprint": lora_drop.weights_fingerprint(model),
        "eval": {"data": held_out.source, "fingerprint": held_out.fingerprint(), "sequences": held_out.windows.size(0),
                 "length": held_out.windows.size(1) - 1, "prompt_lens": held_out.prompt_lens},
        "speed": {"prompt": options.prompt, "tokens": options.speed_tokens, "repeats": options.speed_repeats,
                  "device": p.device.type},
    }
    return json.loads(json.dumps(settings))


def changed_settings(old, new, prefix=""):
    """List the dotted names of settings whose values differ between two settings dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def check_grid(model, options):
    """Build every cell's training arguments and schedule once, so that a bad cell fails before any training."""
    n_layer = model.config.n_layer
    for period in options.periods:
        for share in options.shares:
            args = cell_training_args(options, period, share)
            if args.seq_len > model.config.max_seq_len:
                raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context of "
                                 f"{model.config.max_seq_len} tokens; lower it in --train-args")
            schedule = Schedule.make(n_layer, args.layers, period)
            if not schedule.layers:
                raise ValueError(f"droppable share {share:g} drops no layer of this {n_layer}-layer model "
                                 f"(round({share:g} x {n_layer}) = 0); raise it in --shares")


# -----------------------------------------------------------------------------
# One cell: train, measure quality, time decoding


def resumable(args, model, train_data):
    """Return True when the training state next to args.out was saved by a run of the same options.

    The saved run must have the same train_correctors options, the same planned --steps and the
    same training data, and its correctors must belong to this model. train_correctors then
    continues it (--resume): an interrupted cell keeps its finished steps, and a finished one
    trains no further step.
    """
    path = tc.training_state_path(args.out)
    if not (os.path.isfile(path) and os.path.isfile(args.out)):
        return False
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # torch.load raises several types for truncated or foreign files
        return False
    if not isinstance(state, dict) or state.get("format") != tc.STATE_FORMAT:
        return False
    saved = state.get("args", {})
    if any(saved.get(key) != getattr(args, key) for key in tc.RESUME_KEYS + ("steps",)):
        return False
    try:
        lora_drop.load_correctors(args.out, model)
    except ValueError:  # unreadable, or trained for another base model
        return False
    return state.get("data") == train_data


def measure_speed(model, prompt_ids, drop, n_tokens=SPEED_TOKENS, repeats=SPEED_REPEATS):
    """Time greedy decoding of n_tokens with and without `drop`, interleaved after a warm-up; return medians and ratios.

    The speedup compares decode tokens per second (the prompt's prefill excluded). The ideal
    speedup counts the weight bytes each decode step reads (bench.ideal_speedup). The KV
    reduction is measured on this run's prompt and token count, so it grows with n_tokens.
    """
    warm_up = min(8, n_tokens)
    bench.time_ours(model, prompt_ids, warm_up)
    bench.time_ours(model, prompt_ids, warm_up, drop)
    plain, dropped = [], []
    for _ in range(repeats):
        plain.append(bench.time_ours(model, prompt_ids, n_tokens))
        dropped.append(bench.time_ours(model, prompt_ids, n_tokens, drop))
    plain_tps = statistics.median(run[1] for run in plain)
    drop_tps = statistics.median(run[1] for run in dropped)
    full_bytes, lora_bytes = bench.weight_bytes_per_token(model, drop)
    return {
        "plain_tokens_per_s": plain_tps,
        "lora_drop_tokens_per_s": drop_tps,
        "speedup": drop_tps / plain_tps,
        "ideal_speedup": bench.ideal_speedup(model, drop),
        "weight_bytes_plain_step": full_bytes,
        "weight_bytes_lora_step": lora_bytes,
        "kv_bytes_plain": plain[0][2],
        "kv_bytes_lora_drop": dropped[0][2],
        "kv_reduction": 1 - dropped[0][2] / plain[0][2],
        "prompt_tokens": len(prompt_ids),
        "new_tokens": n_tokens,
    }


def run_cell(model, tokenizer, share, args, train_data, held_out, prompt_ids, options, model_name, log):
    """Train one cell's correctors (or continue its saved run), then measure quality and speed; return its record."""
    t0 = time.perf_counter()
    args.resume = not options.force and resumable(args, model, train_data)
    if args.resume:
        log(f"continuing the saved training run in {tc.training_state_path(args.out)}")
    summary = tc.train(model, tokenizer, args, model_name=model_name, log=log)
    drop, _ = lora_drop.load_correctors(args.out, model)
    quality = tc.evaluate(model, drop, held_out.batches(), held_out.prompt_lens)
    quality["ppl_ratio"] = quality["ppl"] / quality["full_ppl"]
    speed = measure_speed(model, prompt_ids, drop, options.speed_tokens, options.speed_repeats)
    schedule = drop.schedule
    return {
        "period": schedule.period,
        "share": share,
        "layers": list(schedule.layers),
        "n_layer": model.config.n_layer,
        "checkpoint": os.path.relpath(args.out, os.path.dirname(os.path.abspath(options.out))),
        "quality": quality,
        "speed": speed,
        "train": {"steps": summary["steps"], "trained_steps": summary["trained_steps"],
                  "seconds_per_step": summary["seconds_per_step"], "final_loss": summary["final_loss"]},
        "seconds": time.perf_counter() - t0,
    }


# -----------------------------------------------------------------------------
# Results file


def empty_results():
    return {"format": RESULTS_FORMAT, "cells": {}}


def load_results(path):
    """Read a sweep results file; raise FileNotFoundError or ValueError naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sweep results at {path}; run python sweep.py first, or pass the right --out")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable sweep results file ({err}); move it away or pass another --out") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT or not isinstance(results.get("cells"), dict):
        raise ValueError(f"{path} is not a lora-drop sweep results file (no format {RESULTS_FORMAT!r}); "
                         "move it away or pass another --out")
    return results


def save_results(path, results):
    """Write the results JSON to a temporary file in the same folder, then rename it over `path`.

    Readers see the old file or the new one, never a partial write, even when writing fails midway.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file readable by its owner only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# The sweep


def run_sweep(model, tokenizer, options, log=log, model_name=""):
    """Run every cell of the grid that the results file lacks or ran with other settings; return the results.

    options: the parsed sweep.py arguments (see parse_args), with periods and shares as lists.
    model_name: the base model's name, stored in each corrector checkpoint.
    The results file is rewritten after each finished cell.
    """
    check_eval_sizes(options.eval_sequences, options.eval_length, options.eval_prompt_len, model.config.max_seq_len)
    check_grid(model, options)
    model.eval()
    results = load_results(options.out) if os.path.exists(options.out) else empty_results()
    held_out = load_held_out(tokenizer, model.config.vocab_size, options.data, options.eval_sequences,
                             options.eval_length, options.eval_prompt_len)
    prompt_ids = tc.chat_prompt_ids(tokenizer, options.prompt)
    model.check_length(len(prompt_ids) + options.speed_tokens)
    cells = [(period, share) for period in options.periods for share in options.shares]
    # Every cell trains on the same windows: the refresh period and droppable layers do not change them.
    train_data = training_data_fingerprint(model, tokenizer, cell_training_args(options, *cells[0]))
    log(f"sweep: {len(cells)} cells, {options.steps} training steps each; quality on {held_out.describe()}; "
        f"speed from {options.speed_tokens} greedy tokens, median of {options.speed_repeats} runs; results in {options.out}")

    t_start, n_run = time.perf_counter(), 0
    for number, (period, share) in enumerate(cells, start=1):
        key = cell_key(period, share)
        args = cell_training_args(options, period, share)
        settings = cell_settings(args, model, train_data, held_out, options)
        old = results["cells"].get(key)
        if old is not None and not options.force:
            changed = changed_settings(old.get("settings", {}), settings)
            if not changed:
                log(f"[{number}/{len(cells)}] {key}: done in an earlier run, skipped")
                continue
            log(f"[{number}/{len(cells)}] {key}: settings changed since it ran ({', '.join(changed)}); running it again")
        else:
            log(f"[{number}/{len(cells)}] {key}: {'running it again (--force)' if old is not None else 'running'}")

        record = run_cell(model, tokenizer, share, args, train_data, held_out, prompt_ids, options, model_name, log)
        record["settings"] = settings
        results["cells"][key] = record
        save_results(options.out, results)
        n_run += 1
        q, s = record["quality"], record["speed"]
        elapsed = time.perf_counter() - t_start
        log(f"[{number}/{len(cells)}] {key}: ppl {q['ppl']:.3f} ({q['ppl_ratio']:.3f}x the full model's), "
            f"top-1 {100 * q['top1']:.1f}%, KL {q['kl']:.4f}; speedup {s['speedup']:.2f}x (ideal {s['ideal_speedup']:.2f}x); "
            f"{record['seconds']:.0f} s, {elapsed / 60:.1f} min so far")
    log(f"sweep finished: {n_run} cells run, {len(cells) - n_run} skipped, in {(time.perf_counter() - t_start) / 60:.1f} min")
    return results


# -----------------------------------------------------------------------------
# Frontier and safe zone


def summary_row(cell):
    """Flatten a cell record into the figures the report compares."""
    q, s = cell["quality"], cell["speed"]
    return {"period": cell["period"], "share": cell["share"], "n_droppable": len(cell["layers"]), "n_layer": cell["n_layer"],
            "speedup": s["speedup"], "ideal_speedup": s["ideal_speedup"], "kv_reduction": s["kv_reduction"],
            "ppl": q["ppl"], "full_ppl": q["full_ppl"], "ppl_ratio": q["ppl_ratio"], "top1": q["top1"], "kl": q["kl"]}


def pareto_front(rows):
    """Return the rows that no other row dominates, fastest first.

    A row dominates another when it decodes at least as fast with a perplexity ratio at least
    as low, and is strictly better on one of the two.
    """
    def dominates(a, b):
        return (a["speedup"] >= b["speedup"] and a["ppl_ratio"] <= b["ppl_ratio"]
                and (a["speedup"] > b["speedup"] or a["ppl_ratio"] < b["ppl_ratio"]))

    front = [row for row in rows if not any(dominates(other, row) for other in rows)]
    return sorted(front, key=lambda row: -row["speedup"])


def pick_safe_schedule(rows, max_ppl_ratio=MAX_PPL_RATIO, min_speedup=MIN_SPEEDUP):
    """Return the fastest row with ppl_ratio <= max_ppl_ratio and speedup >= min_speedup, or None."""
    safe = [row for row in rows if row["ppl_ratio"] <= max_ppl_ratio and row["speedup"] >= min_speedup]
    return max(safe, key=lambda row: row["speedup"], default=None)


def describe_row(row):
    return (f"period {row['period']}, share {100 * row['share']:g}% ({row['n_droppable']} of {row['n_layer']} layers): "
            f"{row['speedup']:.2f}x faster, perplexity ratio {row['ppl_ratio']:.3f}, top-1 {100 * row['top1']:.1f}%, "
            f"KL {row['kl']:.4f}")


def format_report(results, max_ppl_ratio=MAX_PPL_RATIO, min_speedup=MIN_SPEEDUP):
    """Return the frontier table of every cell and the safe-zone verdict, as markdown text."""
    cells = list(results["cells"].values())
    if not cells:
        return "the results file has no finished cell yet; run python sweep.py"
    rows = sorted((summary_row(cell) for cell in cells), key=lambda row: (row["period"], row["share"]))
    front = pareto_front(rows)
    lines = ["| period | share | layers | speedup | ideal | KV saved | ppl ratio | top-1 | KL | frontier |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in rows:
        lines.append(
            f"| {row['period']} | {100 * row['share']:g}% | {row['n_droppable']}/{row['n_layer']} | {row['speedup']:.2f}x "
            f"| {row['ideal_speedup']:.2f}x | {100 * row['kv_reduction']:.0f}% | {row['ppl_ratio']:.3f} "
            f"| {100 * row['top1']:.1f}% | {row['kl']:.4f} | {'*' if row in front else ''} |"
        )
    full_ppls = sorted({round(row["full_ppl"], 6) for row in rows})
    lines.append(f"full model perplexity {', '.join(f'{p:.3f}' for p in full_ppls)}; ppl ratio = LoRA-Drop perplexity / "
                 "full model perplexity; * = on the quality-speed frontier")
    shared = [{k: v for k, v in cell.get("settings", {}).get("train", {}).items() if k not in ("period", "layers")}
              for cell in cells]
    others = [{k: v for k, v in cell.get("settings", {}).items() if k != "train"} for cell in cells]
    suspect = [row for row in rows if row["speedup"] > SUSPECT_SPEEDUP_EXCESS * row["ideal_speedup"]]
    if suspect:
        names = ", ".join(f"period {row['period']} share {100 * row['share']:g}% ({row['speedup']:.2f}x, ideal "
                          f"{row['ideal_speedup']:.2f}x)" for row in suspect)
        lines.append(f"note: the measured speedup exceeds the ideal one for {names}; the machine was probably busy "
                     "while they were timed. To time them again on an idle machine, rerun python sweep.py with their "
                     "--periods and --shares and another --speed-repeats: that keeps their trained correctors")
    if any(s != shared[0] for s in shared) or any(o != others[0] for o in others):
        lines.append("note: the cells ran with different settings (training, held-out text or timing); "
                     "rerun python sweep.py with one set of options to compare them fairly")

    best = pick_safe_schedule(rows, max_ppl_ratio, min_speedup)
    limits = f"perplexity at most {100 * (max_ppl_ratio - 1):g}% above the full model's and at least {min_speedup:g}x faster decoding"
    if best is not None:
        lines.append(f"safe zone ({limits}): the fastest such schedule is {describe_row(best)}")
    else:
        lines.append(f"safe zone ({limits}): no schedule of the {len(rows)} measured qualifies.")
        lines.append("quality-speed frontier (Pareto set), fastest first:")
        lines += [f"- {describe_row(row)}" for row in front]
    return "\n".join(lines)


def verdict(results, max_ppl_ratio=MAX_PPL_RATIO, min_speedup=MIN_SPEEDUP):
    """Return the safe schedule (a summary row or None) and the frontier, for the JSON output."""
    rows = [summary_row(cell) for cell in results["cells"].values()]
    return {"max_ppl_ratio": max_ppl_ratio, "min_speedup": min_speedup,
            "safe": pick_safe_schedule(rows, max_ppl_ratio, min_speedup), "frontier": pareto_front(rows)}


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="print the frontier table and the verdict from --out only, "
                   "without loading a model or running a cell")
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSON file; each cell's correctors go to a folder of the "
                   "same name without .json (default: results/sweep.json and results/sweep/ next to this script)")
    p.add_argument("--force", action="store_true", help="run every cell again, even those done with the same settings")
    p.add_argument("--json", action="store_true", help="print one JSON object with every cell and the verdict as the last stdout line")

    g = p.add_argument_group("grid and training")
    g.add_argument("--periods", default=",".join(map(str, DEFAULT_PERIODS)),
                   help="refresh periods, integers >= 1 separated by commas (default: %(default)s)")
    g.add_argument("--shares", default=",".join(f"{s:g}" for s in DEFAULT_SHARES),
                   help="shares of droppable layers, fractions between 0 and 1 separated by commas; each becomes the "
                        "layers rule fraction:F (default: %(default)s)")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="corrector training steps per cell (default: %(default)s)")
    g.add_argument("--train-args", default="", help="further train_correctors.py options for every cell, in one quoted "
                   "string, e.g. \"--lr 3e-3 --rank 16\" (default: train_correctors' defaults, on its cached "
                   "self-generated data)")

    e = p.add_argument_group("held-out quality")
    e.add_argument("--data", default=None, help="UTF-8 text file to measure quality on, plain text or JSON lines with a "
                   "\"text\" field; it does not change the training data, which --train-args selects (default: Python's "
                   "pydoc_data.topics)")
    e.add_argument("--eval-sequences", type=int, default=EVAL_SEQUENCES, help="held-out windows (default: %(default)s)")
    e.add_argument("--eval-length", type=int, default=EVAL_LENGTH, help="tokens per held-out window (default: %(default)s)")
    e.add_argument("--eval-prompt-len", type=int, default=None, help="tokens of each window fed by prefill; the rest are "
                   "decode steps (default: four lengths from a quarter to half of --eval-length, cycled over the windows)")

    s = p.add_argument_group("decode speed")
    s.add_argument("--prompt", default=gen.DEFAULT_PROMPT, help="prompt of the timed runs, chat template applied (default: %(default)r)")
    s.add_argument("--speed-tokens", type=int, default=SPEED_TOKENS, help="greedy tokens per timed run, >= 2 (default: %(default)s)")
    s.add_argument("--speed-repeats", type=int, default=SPEED_REPEATS, help="timed runs per decoding, interleaved; "
                   "the median counts (default: %(default)s)")

    v = p.add_argument_group("verdict")
    v.add_argument("--max-ppl-ratio", type=float, default=MAX_PPL_RATIO, help="maximum perplexity ratio to the full model "
                   "that counts as safe (default: %(default)s, i.e. 5%% above)")
    v.add_argument("--min-speedup", type=float, default=MIN_SPEEDUP, help="minimum measured decode speedup that counts "
                   "(default: %(default)s)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="GGUF file, Hugging Face directory or model id (default: embedded SmolLM2-135M-Instruct)")
    m.add_argument("--cache-dir", default=None, help="cache for the embedded model and the self-generated data "
                   "(default: $LORA_DROP_CACHE or ~/.cache/lora-drop)")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu")
    m.add_argument("--dtype", default="float32", choices=sorted(gen.DTYPES), help="weight and activation type (default: %(default)s)")
    return p


def check_options(options):
    """Parse the grid into lists; raise ValueError (or FileNotFoundError for --data) naming the first invalid option."""
    options.periods = parse_periods(options.periods)
    options.shares = parse_shares(options.shares)
    if options.steps < 1:
        raise ValueError(f"invalid --steps {options.steps}: it must be an integer >= 1")
    check_eval_sizes(options.eval_sequences, options.eval_length, options.eval_prompt_len)
    if options.data is not None:
        check_data_file(options.data)
    if options.speed_tokens < 2:
        raise ValueError(f"invalid --speed-tokens {options.speed_tokens}: it must be >= 2, because the first token "
                         "comes from prefill and is not timed as a decode step")
    if options.speed_repeats < 1:
        raise ValueError(f"invalid --speed-repeats {options.speed_repeats}: it must be an integer >= 1")
    if not options.max_ppl_ratio >= 1:
        raise ValueError(f"invalid --max-ppl-ratio {options.max_ppl_ratio}: it must be >= 1 (1.05 means 5% above the full model)")
    if not options.min_speedup > 0:
        raise ValueError(f"invalid --min-speedup {options.min_speedup}: it must be > 0")
    if options.model is not None and options.out == DEFAULT_OUT:
        raise ValueError("--model needs --out PATH, so that results for another model do not mix with the default sweep")
    for period in options.periods:
        cell_training_args(options, period, options.shares[0])  # checks --train-args and the training options
    return options


def parse_args(argv=None):
    p = build_parser()
    options = p.parse_args(argv)
    try:
        check_options(options)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    return options


def main(argv=None):
    options = parse_args(argv)
    if options.report:
        results = load_results(options.out)
    else:
        import pretrained

        device = gen.pick_device(options.device)
        model, tokenizer = pretrained.load_model(options.model, device=device, dtype=gen.DTYPES[options.dtype],
                                                 cache_dir=options.cache_dir)
        results = run_sweep(model, tokenizer, options, log, model_name=options.model or pretrained.DEFAULT_GGUF_NAME)
    log(format_report(results, options.max_ppl_ratio, options.min_speedup))
    if options.json:
        print(json.dumps({**results, "verdict": verdict(results, options.max_ppl_ratio, options.min_speedup)}))
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the finished cells and the current cell's training state are saved; "
              "run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
