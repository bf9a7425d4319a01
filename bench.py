"""
Decode-speed benchmark: our plain decoding against Hugging Face `generate`, and
LoRA-Drop against plain decoding, on the same model, prompt and token count, in one run.

    python bench.py                          # embedded SmolLM2-135M-Instruct, CPU, float32, 128 new tokens
    python bench.py --max-new-tokens 256 --repeats 5
    python bench.py --skip-hf                # without transformers (it is a test-time dependency)
    python bench.py --device cuda --dtype bfloat16 --json
    python bench.py --extra-modes none       # only plain and fixed-period LoRA-Drop (and HF)
    python bench.py --lossless-suite         # lossless greedy against plain greedy on 24 varied prompts
    python bench.py --adaptive-eval          # adaptive refresh against fixed periods at equal refresh rates
    python bench.py --quality                # perplexity, top-1 agreement and KL against the full model (sweep.py)

Decoding one token reads every weight once, so it is bound by memory bandwidth. Next to
tokens per second the script prints the weight-read bandwidth (weight bytes read per token
x tokens per second) and, as the machine's reference, the read bandwidth of summing one
large tensor. Each configuration runs --repeats times, interleaved, after a warm-up; the
median is reported. Figures go to stderr; --json prints one JSON object on stdout.
"""

import argparse
import json
import statistics
import sys
import time

import torch

import adaptive
import generate as gen
import lora_drop
import lossless
import pretrained
from lora_drop import generate


def log(msg=""):
    print(msg, file=sys.stderr, flush=True)


def weight_bytes_per_token(model, drop=None):
    """Weight bytes one decode step reads: (refresh or plain step, LoRA step).

    Every parameter is read once per step, except the token and position embeddings, of
    which one row is read (the tied output head still reads the whole token matrix).
    On a LoRA step the droppable blocks are not read, but their correctors are.
    """
    def nbytes(params):
        return sum(p.numel() * p.element_size() for p in params)

    unique = {id(p): p for p in model.parameters()}
    total = nbytes(unique.values())
    emb = model.tok_emb.weight
    if not model.config.tie_embeddings:
        total -= nbytes([emb]) - emb.size(1) * emb.element_size()
    if hasattr(model, "pos_emb"):
        total -= nbytes([model.pos_emb.weight]) - emb.size(1) * emb.element_size()
    if drop is None:
        return total, total
    skipped = nbytes(p for i in drop.schedule.layers for p in model.blocks[i].parameters())
    return total, total - skipped + nbytes(drop.parameters())


def ideal_speedup(model, drop):
    """Plain bytes per token over LoRA-Drop's mean bytes per decode step, over one refresh cycle."""
    full, lora = weight_bytes_per_token(model, drop)
    k = drop.schedule.period
    return full / (((k - 1) * lora + full) / k)


def sum_bandwidth(n_bytes=1 << 30, repeats=5, device="cpu"):
    """Read bandwidth in GB/s of summing one large float32 tensor (best of `repeats`)."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def time_ours(model, prompt_ids, n_new, drop=None):
    """Return (end-to-end tok/s, decode tok/s, KV bytes) for one greedy generation of n_new tokens."""
    sync = torch.cuda.synchronize if model.tok_emb.weight.is_cuda else (lambda: None)
    cache = model.new_cache(1, len(prompt_ids) + n_new - 1, drop, len(prompt_ids))
    sync()
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _ in generate(model, prompt_ids, n_new, drop, cache=cache):
        n += 1
        if t_first is None:
            sync()
            t_first = time.perf_counter()
    sync()
    t_end = time.perf_counter()
    return n / (t_end - t0), (n - 1) / (t_end - t_first), cache.nbytes()


def time_mode(model, prompt_ids, n_new, drop, mode, policy=None, adaptive_drafts=False):
    """Return (end-to-end tok/s, decode tok/s, KV bytes, stats) for one greedy run of "lossless" or "adaptive"."""
    sync = torch.cuda.synchronize if model.tok_emb.weight.is_cuda else (lambda: None)
    P = len(prompt_ids)
    if mode == "lossless":
        cache, stats = model.new_cache(1, P + n_new, drop=None), lossless.LosslessStats()
        tokens = lossless.generate_lossless(model, prompt_ids, n_new, drop, cache=cache, stats=stats,
                                            adaptive_drafts=adaptive_drafts)
    else:
        cache, stats = model.new_cache(1, P + n_new - 1, drop=None), adaptive.AdaptiveStats()
        tokens = adaptive.generate_adaptive(model, prompt_ids, n_new, drop, policy, cache=cache, stats=stats)
    sync()
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _ in tokens:
        n += 1
        if t_first is None:
            sync()
            t_first = time.perf_counter()
    sync()
    t_end = time.perf_counter()
    return n / (t_end - t0), (n - 1) / (t_end - t_first), cache.nbytes(), stats


def run_adaptive_eval(model, tokenizer, drop, args):
    """Teacher-forced quality of adaptive refresh against fixed periods on held-out text (see adaptive.py)."""
    tokens = adaptive.heldout_sequences(tokenizer, args.eval_sequences, args.eval_length, model.config.max_seq_len)
    tokens = tokens.to(model.tok_emb.weight.device)
    max_interval = args.max_interval or drop.schedule.period
    log(f"held-out text: {args.eval_sequences} sequences of {args.eval_length} tokens from pydoc_data.topics, "
        f"prompt {args.eval_prompt_len} tokens; adaptive max interval {max_interval}")
    return adaptive.compare_with_fixed(model, drop, tokens, args.eval_prompt_len, args.eval_thresholds, max_interval,
                                       periods=range(1, 2 * max_interval + 1), log=log)


def load_hf_reference(gguf_path, device, dtype):
    import os

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=dtype
    )
    return hf.to(device).eval()


def time_hf(hf, prompt_ids, n_new):
    """Return (end-to-end tok/s, decode tok/s) of Hugging Face greedy `generate` for n_new tokens."""
    device = next(hf.parameters()).device
    idx = torch.tensor([prompt_ids], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(n):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        sync()
        assert out.size(1) == idx.size(1) + n
        return time.perf_counter() - t0

    t_one, t_all = run(1), run(n_new)
    return n_new / t_all, (n_new - 1) / (t_all - t_one)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file, HF directory or id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", default=gen.DEFAULT_PROMPT, help="prompt text, chat template applied")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration, interleaved (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(gen.DTYPES), help="(default: %(default)s)")
    p.add_argument("--ckpt", default=None, help="corrector checkpoint (default: the shipped one, if present)")
    p.add_argument("--period", type=int, default=None, help="refresh period (default: 8 or the checkpoint's)")
    p.add_argument("--layers", default=None, help="droppable-layer rule (default: the checkpoint's or 'default')")
    p.add_argument("--skip-hf", action="store_true", help="do not time Hugging Face generate")
    p.add_argument("--extra-modes", default="lossless,adaptive",
                   help="modes timed in the same loop next to plain and fixed-period LoRA-Drop, comma-separated: "
                        "lossless, adaptive, or none (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=adaptive.AdaptiveRefresh.threshold,
                   help="adaptive refresh: top-1 probability in [0, 1] at or below which the next step refreshes (default: %(default)s)")
    p.add_argument("--max-interval", type=int, default=None,
                   help="adaptive refresh: maximum number of decode steps between refresh steps (default: the refresh period)")
    p.add_argument("--lossless-suite", action="store_true",
                   help="instead of the timing loop, run lossless and plain greedy decoding on 24 prompts")
    p.add_argument("--adaptive-drafts", action="store_true",
                   help="lossless mode and --lossless-suite: adapt the number of drafts per cycle to the acceptance (see lossless.py)")
    p.add_argument("--suite-tokens", type=int, default=64, help="tokens per prompt for --lossless-suite (default: %(default)s)")
    p.add_argument("--adaptive-eval", action="store_true",
                   help="instead of the timing loop, compare adaptive refresh with fixed periods on held-out text")
    p.add_argument("--eval-thresholds", default="0.3,0.5,0.7,0.9",
                   help="thresholds for --adaptive-eval, comma-separated (default: %(default)s)")
    p.add_argument("--quality", action="store_true",
                   help="instead of the timing loop, print a table of perplexity, top-1 agreement and KL against the "
                        "full model on held-out text, for plain skipping, zero correctors and trained correctors")
    p.add_argument("--data", default=None, help="--quality: UTF-8 text file to measure on, plain text or JSON lines "
                   "with a \"text\" field (default: Python's pydoc_data.topics)")
    p.add_argument("--eval-sequences", type=int, default=None,
                   help="held-out sequences (default: 4 for --adaptive-eval, 16 for --quality)")
    p.add_argument("--eval-length", type=int, default=None,
                   help="tokens per held-out sequence (default: 128 for --adaptive-eval, 256 for --quality)")
    p.add_argument("--eval-prompt-len", type=int, default=None,
                   help="tokens of each held-out sequence fed by prefill; the rest are decode steps (default: 32 for "
                        "--adaptive-eval; for --quality, four lengths from a quarter to half of --eval-length)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure on stdout")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    modes = [] if args.extra_modes.strip() == "none" else [m.strip() for m in args.extra_modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("lossless", "adaptive")]
    if unknown:
        p.error(f"unknown mode {unknown[0]!r} in --extra-modes: use lossless, adaptive, or none")
    if not 0 <= args.threshold <= 1:
        p.error(f"invalid --threshold {args.threshold}: it must be a top-1 probability in [0, 1]")
    if args.max_interval is not None and args.max_interval < 1:
        p.error(f"invalid --max-interval {args.max_interval}: it must be at least 1 decode step")
    if args.suite_tokens < 1:
        p.error(f"invalid --suite-tokens {args.suite_tokens}: it must be >= 1")
    try:
        args.eval_thresholds = [float(t) for t in args.eval_thresholds.split(",")]
    except ValueError:
        p.error(f"invalid --eval-thresholds {args.eval_thresholds!r}: give numbers in [0, 1] separated by commas")
    if not all(0 <= t <= 1 for t in args.eval_thresholds):
        p.error(f"invalid --eval-thresholds {args.eval_thresholds}: every threshold must be in [0, 1]")
    if args.quality and (args.adaptive_eval or args.lossless_suite):
        p.error("--quality excludes --adaptive-eval and --lossless-suite; choose one")
    if args.data is not None and not args.quality:
        p.error("--data applies only to --quality; add --quality")
    if args.quality:
        import sweep  # sweep.py imports this file, so it is imported only where it is used

        args.eval_sequences = sweep.EVAL_SEQUENCES if args.eval_sequences is None else args.eval_sequences
        args.eval_length = sweep.EVAL_LENGTH if args.eval_length is None else args.eval_length
        try:
            sweep.check_eval_sizes(args.eval_sequences, args.eval_length, args.eval_prompt_len)
            if args.data is not None:
                sweep.check_data_file(args.data)
        except (ValueError, FileNotFoundError) as err:
            p.error(str(err))
    else:
        args.eval_sequences = 4 if args.eval_sequences is None else args.eval_sequences
        args.eval_length = 128 if args.eval_length is None else args.eval_length
        args.eval_prompt_len = 32 if args.eval_prompt_len is None else args.eval_prompt_len
        if args.eval_sequences < 1 or not 1 <= args.eval_prompt_len <= args.eval_length - 2:
            p.error(f"invalid held-out sizes: --eval-sequences must be >= 1 (got {args.eval_sequences}) and "
                    f"--eval-prompt-len from 1 to --eval-length - 2 (got {args.eval_prompt_len} and {args.eval_length})")
    lora_drop.check_sampling(args.max_new_tokens, 0.0, None, None)

    device = gen.pick_device(args.device)
    dtype = gen.DTYPES[args.dtype]
    torch.manual_seed(0)
    model, tokenizer = pretrained.load_model(args.model, device=device, dtype=dtype)
    model.eval()
    drop_args = argparse.Namespace(no_drop=False, ckpt=args.ckpt, model=args.model, period=args.period,
                                   layers=args.layers, reuse=None)
    drop, source = gen.build_drop(model, drop_args, log)
    prompt_ids = tokenizer.apply_chat_template(args.prompt) if tokenizer.has_chat_template else tokenizer.encode(args.prompt)
    if args.lossless_suite:
        res = lossless.run_prompt_suite(model, tokenizer, drop, args.suite_tokens, log=log, adaptive_drafts=args.adaptive_drafts)
        if args.json:
            print(json.dumps(res))
        return res
    if args.quality:
        trained = drop if source != "zero correctors" else None  # build_drop's label when no checkpoint was found
        res = sweep.run_quality(model, tokenizer, drop.schedule, trained, source, args.data, args.eval_sequences,
                                args.eval_length, args.eval_prompt_len, log=log)
        if args.json:
            print(json.dumps(res))
        return res
    if args.adaptive_eval:
        res = run_adaptive_eval(model, tokenizer, drop, args)
        if args.json:
            print(json.dumps(res))
        return res
    policy = adaptive.AdaptiveRefresh(args.threshold, args.max_interval or drop.schedule.period)
    n = args.max_new_tokens
    log(f"device {device}, {args.dtype}, {torch.get_num_threads()} threads, prompt {len(prompt_ids)} tokens, "
        f"{n} new tokens, {args.repeats} runs each")

    hf = None
    if not args.skip_hf:
        path = args.model or str(pretrained.default_gguf_path())
        if not path.endswith(".gguf"):
            raise ValueError("the Hugging Face comparison loads a GGUF file; pass --model FILE.gguf or --skip-hf")
        hf = load_hf_reference(path, device, dtype)

    # Warm up every path once, then interleave the timed runs so drift hits all alike.
    time_ours(model, prompt_ids, 8)
    time_ours(model, prompt_ids, 8, drop)
    if hf is not None:
        time_hf(hf, prompt_ids, 8)
    for mode in modes:
        time_mode(model, prompt_ids, 8, drop, mode, policy, args.adaptive_drafts)
    runs = {"plain": [], "lora_drop": [], "hf": [], "lossless": [], "adaptive": []}
    for _ in range(args.repeats):
        runs["plain"].append(time_ours(model, prompt_ids, n))
        runs["lora_drop"].append(time_ours(model, prompt_ids, n, drop))
        for mode in modes:
            runs[mode].append(time_mode(model, prompt_ids, n, drop, mode, policy, args.adaptive_drafts))
        if hf is not None:
            runs["hf"].append(time_hf(hf, prompt_ids, n))
    bandwidth = sum_bandwidth(device=device)

    def median(name, j):
        return statistics.median(r[j] for r in runs[name])

    full_bytes, lora_bytes = weight_bytes_per_token(model, drop)
    k = drop.schedule.period
    mean_drop_bytes = ((k - 1) * lora_bytes + full_bytes) / k
    plain_tps, drop_tps = median("plain", 1), median("lora_drop", 1)
    res = {
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "new_tokens": n, "prompt_tokens": len(prompt_ids), "repeats": args.repeats,
        "sum_read_gb_s": bandwidth,
        "weight_bytes_per_token": full_bytes,
        "plain_e2e_tokens_per_s": median("plain", 0),
        "plain_decode_tokens_per_s": plain_tps,
        "plain_weight_read_gb_s": full_bytes * plain_tps / 1e9,
        "lora_drop_decode_tokens_per_s": drop_tps,
        "lora_drop_weight_read_gb_s": mean_drop_bytes * drop_tps / 1e9,
        "speedup": drop_tps / plain_tps,
        "ideal_speedup": ideal_speedup(model, drop),
        "kv_bytes_plain": runs["plain"][0][2],
        "kv_bytes_lora_drop": runs["lora_drop"][0][2],
        "schedule": {"layers": list(drop.schedule.layers), "period": k, "reuse": drop.schedule.reuse, "source": source},
    }
    res["kv_reduction"] = 1 - res["kv_bytes_lora_drop"] / res["kv_bytes_plain"]
    res["plain_share_of_sum_bandwidth"] = res["plain_weight_read_gb_s"] / bandwidth
    if hf is not None:
        res["hf_e2e_tokens_per_s"] = median("hf", 0)
        res["hf_decode_tokens_per_s"] = median("hf", 1)
        res["ours_over_hf_e2e"] = res["plain_e2e_tokens_per_s"] / res["hf_e2e_tokens_per_s"]
        res["ours_over_hf_decode"] = plain_tps / res["hf_decode_tokens_per_s"]
    for mode in modes:
        res[f"{mode}_e2e_tokens_per_s"] = median(mode, 0)
        res[f"{mode}_decode_tokens_per_s"] = median(mode, 1)
        res[f"{mode}_speedup"] = median(mode, 1) / plain_tps
        res[f"kv_bytes_{mode}"] = runs[mode][0][2]
        # Greedy decoding repeats the same tokens and decisions, so every run has the same counts.
        res[f"{mode}_stats"] = runs[mode][0][3].summary()
    if "adaptive" in modes:
        res["adaptive_policy"] = {"threshold": policy.threshold, "max_interval": policy.max_interval}

    log(f"\nweights read per token: plain {full_bytes / 1e6:.0f} MB, LoRA step {lora_bytes / 1e6:.0f} MB; "
        f"sum() reads {bandwidth:.1f} GB/s")
    log(f"{'':22} {'e2e tok/s':>10} {'decode tok/s':>13} {'ms/token':>9} {'GB/s':>6}")
    if hf is not None:
        log(f"{'HF generate':22} {res['hf_e2e_tokens_per_s']:10.1f} {res['hf_decode_tokens_per_s']:13.1f} "
            f"{1000 / res['hf_decode_tokens_per_s']:9.1f} {full_bytes * res['hf_decode_tokens_per_s'] / 1e9:6.1f}")
    log(f"{'ours, plain':22} {res['plain_e2e_tokens_per_s']:10.1f} {plain_tps:13.1f} {1000 / plain_tps:9.1f} "
        f"{res['plain_weight_read_gb_s']:6.1f}")
    log(f"{'ours, LoRA-Drop':22} {median('lora_drop', 0):10.1f} {drop_tps:13.1f} {1000 / drop_tps:9.1f} "
        f"{res['lora_drop_weight_read_gb_s']:6.1f}")
    for mode in modes:
        tps = res[f"{mode}_decode_tokens_per_s"]
        log(f"{'ours, ' + mode:22} {res[f'{mode}_e2e_tokens_per_s']:10.1f} {tps:13.1f} {1000 / tps:9.1f}")
    if hf is not None:
        log(f"ours / HF: {res['ours_over_hf_e2e']:.2f}x end to end, {res['ours_over_hf_decode']:.2f}x decode")
    log(f"plain weight reads reach {100 * res['plain_share_of_sum_bandwidth']:.0f}% of sum() bandwidth")
    log(f"LoRA-Drop ({len(drop.schedule.layers)} of {model.config.n_layer} layers, period {k}, {source}): "
        f"speedup {res['speedup']:.2f}x of an ideal {res['ideal_speedup']:.2f}x "
        f"({100 * res['speedup'] / res['ideal_speedup']:.0f}% of ideal); "
        f"KV cache {100 * res['kv_reduction']:.1f}% smaller")
    if "lossless" in modes:
        s = res["lossless_stats"]
        log(f"lossless greedy: speedup {res['lossless_speedup']:.2f}x, acceptance rate {s['acceptance_rate']:.2f}, "
            f"{s['tokens_per_cycle']:.2f} tokens per cycle of "
            f"{'0 to ' if args.adaptive_drafts else ''}{k - 1} drafts; the KV cache stores every position")
    if "adaptive" in modes:
        s = res["adaptive_stats"]
        log(f"adaptive refresh (threshold {policy.threshold}, max interval {policy.max_interval}): "
            f"speedup {res['adaptive_speedup']:.2f}x, mean refresh interval {s['mean_refresh_interval']:.2f} steps "
            f"against the fixed period {k}; KV cache {100 * (1 - res['kv_bytes_adaptive'] / res['kv_bytes_plain']):.1f}% smaller")
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    gen.run_cli(main)
