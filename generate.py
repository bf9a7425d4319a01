"""
Generate text with the plain model or with LoRA-Drop decoding.

    python generate.py                                   # embedded SmolLM2-135M-Instruct, shipped correctors
    python generate.py --prompt "Why is the sky blue?" --max-new-tokens 200
    python generate.py --temperature 0.8 --top-p 0.9 --seed 1
    python generate.py --no-drop                         # plain decoding, every layer on every step
    python generate.py --period 4 --layers fraction:0.5  # another schedule
    python generate.py --compare --max-new-tokens 256    # plain vs LoRA-Drop: speed, KV bytes, agreement
    python generate.py --lossless                        # LoRA steps draft, the full model verifies: plain output
    python generate.py --refresh adaptive --threshold 0.5 --max-interval 8   # refresh when the model is unsure
    python generate.py --model path/to/hf_dir --raw      # a Hugging Face GPT-2/Llama/Mistral/Qwen2 checkpoint

Only generated text goes to stdout, as it is generated; timing and diagnostics go to
stderr. With --json the last stdout line is one JSON object for scripts.
"""

import argparse
import json
import os
import sys
import time

import torch

import adaptive
import lora_drop
import lossless
import pretrained
from lora_drop import LoRADrop, Schedule, generate

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "checkpoints", "smollm2-135m-instruct.safetensors")
DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: %(default)r)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="number of tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling (default: %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--model", default=None, help="GGUF file, Hugging Face directory or model id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None, help="where the embedded model is cached (default: $LORA_DROP_CACHE or ~/.cache/lora-drop)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight and activation type (default: %(default)s)")
    p.add_argument("--ckpt", default=None, help="corrector checkpoint (default: the shipped one for the embedded model, if present)")
    p.add_argument("--period", type=int, default=None, help="refresh period k: every k-th decode step runs all layers (default: 8, or the checkpoint's)")
    p.add_argument("--layers", default=None, help="droppable layers: 'default', '1,2,5', 'stride:S' or 'fraction:F' (default: the checkpoint's, or 'default')")
    p.add_argument("--reuse", default=None, choices=lora_drop.REUSE_RULES, help="what a skipped layer reuses (default: state, or the checkpoint's)")
    p.add_argument("--no-drop", action="store_true", help="plain decoding: run every layer on every step")
    p.add_argument("--lossless", action="store_true",
                   help="LoRA steps draft period - 1 tokens, then one full pass verifies them: the full model's "
                        "output (greedy) or distribution (sampling), without LoRA-Drop's KV-cache saving")
    p.add_argument("--adaptive-drafts", action="store_true",
                   help="with --lossless: draft fewer tokens, or none, while drafts are rejected, so a weak drafter "
                        "costs about what plain decoding costs (see lossless.py)")
    p.add_argument("--refresh", default="fixed", choices=("fixed", "adaptive"),
                   help="fixed: every period-th step is a refresh step; adaptive: refresh after a step whose "
                        "top-1 probability is at or below --threshold, or after --max-interval steps (default: fixed)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"adaptive refresh: top-1 probability in [0, 1] at or below which the next step is a refresh "
                        f"step; 1 refreshes every step, 0 never (default: {adaptive.AdaptiveRefresh.threshold})")
    p.add_argument("--max-interval", type=int, default=None,
                   help="adaptive refresh: maximum number of decode steps between two refresh steps (default: the refresh period)")
    p.add_argument("--compare", action="store_true", help="run plain and LoRA-Drop decoding on the same prompt and compare them")
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last stdout line")
    args = p.parse_args(argv)
    if args.no_drop and args.compare:
        p.error("--no-drop and --compare exclude each other: --compare already runs the plain model")

    # Lossless mode and adaptive refresh
    if args.no_drop and args.lossless:
        p.error("--lossless drafts tokens with LoRA steps, so it cannot run with --no-drop; remove one of the two")
    if args.no_drop and args.refresh == "adaptive":
        p.error("--refresh adaptive chooses between LoRA and refresh steps, so it cannot run with --no-drop; remove one of the two")
    if args.lossless and args.refresh == "adaptive":
        p.error("--lossless and --refresh adaptive exclude each other: in lossless mode every verification pass is a refresh")
    if args.adaptive_drafts and not args.lossless:
        p.error("--adaptive-drafts sets the draft length of lossless mode; add --lossless")
    if args.refresh != "adaptive" and (args.threshold is not None or args.max_interval is not None):
        p.error("--threshold and --max-interval apply only to adaptive refresh; add --refresh adaptive")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error(f"invalid --threshold {args.threshold}: it must be a top-1 probability in [0, 1]")
    if args.max_interval is not None and args.max_interval < 1:
        p.error(f"invalid --max-interval {args.max_interval}: it must be at least 1 decode step")
    return args


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def build_drop(model, args, log):
    """Return the LoRADrop to decode with (None for --no-drop) and a label for where it came from."""
    if args.no_drop:
        return None, "plain"
    ckpt = args.ckpt
    if ckpt is None and args.model is None and os.path.isfile(DEFAULT_CKPT):
        ckpt = DEFAULT_CKPT
    if ckpt is not None:
        drop, meta = lora_drop.load_correctors(ckpt, model)
        source = f"correctors from {os.path.relpath(ckpt)}"
        if args.period is not None or args.layers is not None or args.reuse is not None:
            # Overriding the schedule keeps the trained correctors of layers that stay droppable.
            base = drop.schedule
            schedule = Schedule.make(
                model.config.n_layer,
                args.layers if args.layers is not None else list(base.layers),
                args.period if args.period is not None else base.period,
                args.reuse if args.reuse is not None else base.reuse,
            )
            if schedule != base:
                log(f"note: the correctors were trained for period {base.period}, reuse {base.reuse} and "
                    f"{len(base.layers)} droppable layers; with another schedule their quality is not measured")
            trained = drop.correctors
            drop = LoRADrop(model.config, schedule, rank=drop.rank, alpha=drop.alpha).to(model.tok_emb.weight)
            for name, corrector in drop.correctors.items():
                if name in trained:
                    corrector.load_state_dict(trained[name].state_dict())
            untrained = [n for n in drop.correctors if n not in trained]
            if untrained:
                log(f"note: layers {', '.join(untrained)} have no trained corrector in the checkpoint; they use zero correctors")
        return drop, source
    schedule = Schedule.make(model.config.n_layer, args.layers, 8 if args.period is None else args.period,
                             "state" if args.reuse is None else args.reuse)
    log(
        "warning: no corrector checkpoint, so the correctors are untrained (zero) and quality will suffer; "
        "train them with train_correctors.py and pass --ckpt"
    )
    return LoRADrop(model.config, schedule).to(model.tok_emb.weight), "zero correctors"


def start_decoding(model, prompt_ids, args, drop, generator, stop_ids):
    """Return (token iterator, KV cache, stats or None) for the mode args select; drop=None decodes plainly.

    Lossless mode and adaptive refresh allocate every layer's cache at full capacity: lossless
    stores every position, and adaptive refresh cannot know its refresh steps in advance.
    """
    n, P = args.max_new_tokens, len(prompt_ids)
    sampling = (args.temperature, args.top_k, args.top_p, generator, stop_ids)
    if drop is not None and args.lossless:
        cache, stats = model.new_cache(1, P + n, drop=None), lossless.LosslessStats()
        tokens = lossless.generate_lossless(model, prompt_ids, n, drop, *sampling, cache, stats,
                                            adaptive_drafts=args.adaptive_drafts)
        return tokens, cache, stats
    if drop is not None and args.refresh == "adaptive":
        threshold = adaptive.AdaptiveRefresh.threshold if args.threshold is None else args.threshold
        policy = adaptive.AdaptiveRefresh(threshold, args.max_interval or drop.schedule.period)
        cache, stats = model.new_cache(1, P + n - 1, drop=None), adaptive.AdaptiveStats()
        return adaptive.generate_adaptive(model, prompt_ids, n, drop, policy, *sampling, cache, stats), cache, stats
    cache = model.new_cache(1, P + n - 1, drop, P)
    return generate(model, prompt_ids, n, drop, *sampling, cache), cache, None


def run_generation(model, tokenizer, prompt_ids, args, drop, stream=None, stop_ids=()):
    """Generate once; return a dict with the ids, text, timing and KV-cache bytes."""
    generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(args.seed)
    tokens, cache, stats = start_decoding(model, prompt_ids, args, drop, generator, stop_ids)
    sync = torch.cuda.synchronize if model.tok_emb.weight.is_cuda else (lambda: None)
    ids = []
    pieces = tokenizer.stream_decoder()
    t0 = time.perf_counter()
    t_first = None
    for token in tokens:
        if t_first is None:
            sync()
            t_first = time.perf_counter()
        ids.append(token)
        if stream is not None:
            stream.write(pieces.push(token))  # holds back a multi-byte character until it is complete
            stream.flush()
    sync()
    t_end = time.perf_counter()
    n_decode = len(ids) - 1
    text = tokenizer.decode(ids)
    if stream is not None:
        stream.write(pieces.flush() + "\n")
        stream.flush()

    lora_step_share = 0.0
    if isinstance(stats, lossless.LosslessStats):
        # Share of forward passes that were LoRA steps: each cycle runs its drafts and one verification pass.
        lora_step_share = stats.drafted / max(1, stats.drafted + stats.cycles)
    elif isinstance(stats, adaptive.AdaptiveStats):
        lora_step_share = 1 - stats.refresh_rate if stats.decode_steps else 0.0
    elif drop is not None and n_decode:
        lora_step_share = sum(not drop.schedule.is_refresh(j) for j in range(1, n_decode + 1)) / n_decode
    result = {
        "ids": ids,
        "text": text,
        "new_tokens": len(ids),
        "prefill_ms": 1000 * (t_first - t0),
        "decode_tokens_per_s": n_decode / (t_end - t_first) if n_decode else float("nan"),
        "kv_bytes": cache.nbytes(),
        "kv_bytes_all_positions": cache.full_nbytes(),
        "lora_step_share": lora_step_share,
    }
    if stats is not None:
        result.update(stats.summary())
    return result


def agreement(ids, reference):
    """Share of positions where two generations have the same token (over the longer one)."""
    n = max(len(ids), len(reference))
    return sum(a == b for a, b in zip(ids, reference)) / n if n else 1.0


def decoding_mode(args, drop):
    if drop is None:
        return "plain"
    if args.lossless:
        return "lossless"
    return "adaptive" if args.refresh == "adaptive" else "lora-drop"


def log_mode_stats(result, log):
    """Log lossless mode's acceptance figures or adaptive refresh's refresh rate, when the result has them."""
    if "acceptance_rate" in result:
        log(f"lossless: {result['cycles']} cycles, acceptance rate {result['acceptance_rate']:.2f}, "
            f"{result['tokens_per_cycle']:.2f} tokens per cycle, {result['undrafted']} cycles without drafts")
    if "refresh_rate" in result:
        log(f"adaptive refresh: {result['refresh_steps']} refresh steps in {result['decode_steps']} decode steps "
            f"({result['signal_refreshes']} chosen by the signal), mean interval {result['mean_refresh_interval']:.2f}")


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    lora_drop.check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)

    model, tokenizer = pretrained.load_model(args.model, device=device, dtype=DTYPES[args.dtype], cache_dir=args.cache_dir)
    model.eval()
    drop, source = build_drop(model, args, log)
    if args.raw or not tokenizer.has_chat_template:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        prompt_ids = tokenizer.apply_chat_template(args.prompt)
    model.check_length(len(prompt_ids) + args.max_new_tokens)
    stop_ids = () if (args.ignore_eos or args.compare) else tuple(tokenizer.eos_ids)
    if drop is not None:
        s = drop.schedule
        log(f"LoRA-Drop: {len(s.layers)} of {model.config.n_layer} layers droppable, period {s.period}, reuse {s.reuse}, {source}")
        if args.lossless:
            drafts = f"0 to {s.period - 1} (adaptive)" if args.adaptive_drafts else f"{s.period - 1}"
            log(f"lossless mode: {drafts} LoRA drafts per cycle, verified by one pass of the full model")
        elif args.refresh == "adaptive":
            threshold = adaptive.AdaptiveRefresh.threshold if args.threshold is None else args.threshold
            log(f"adaptive refresh: top-1 probability <= {threshold}, or {args.max_interval or s.period} steps since the last refresh")

    if not args.compare:
        result = run_generation(model, tokenizer, prompt_ids, args, drop, stream=sys.stdout, stop_ids=stop_ids)
        log(
            f"prompt {len(prompt_ids)} tokens, prefill {result['prefill_ms']:.1f} ms; "
            f"{result['new_tokens']} new tokens, decode {result['decode_tokens_per_s']:.1f} tok/s; "
            f"KV cache {result['kv_bytes'] / 2**20:.2f} MiB"
        )
        log_mode_stats(result, log)
        if args.json:
            summary = {k: v for k, v in result.items() if k != "ids"}
            summary["mode"] = decoding_mode(args, drop)
            print(json.dumps(summary))
        return summary if args.json else result

    # --compare: warm up once, then time plain and LoRA-Drop decoding of the same number of tokens.
    log("--compare decodes exactly --max-new-tokens tokens in both runs, ignoring end-of-sequence")
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": min(8, args.max_new_tokens)})
    run_generation(model, tokenizer, prompt_ids, warm, None)
    run_generation(model, tokenizer, prompt_ids, warm, drop)
    plain = run_generation(model, tokenizer, prompt_ids, args, None)
    dropped = run_generation(model, tokenizer, prompt_ids, args, drop)
    summary = {
        "plain": {k: v for k, v in plain.items() if k != "ids"},
        "lora_drop": {k: v for k, v in dropped.items() if k != "ids"},
        "speedup": dropped["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
        "kv_reduction": 1 - dropped["kv_bytes"] / plain["kv_bytes"],
        "agreement": agreement(dropped["ids"], plain["ids"]),
        "lora_step_share": dropped["lora_step_share"],
    }
    print("=== plain ===")
    print(plain["text"])
    mode = decoding_mode(args, drop)
    print("=== LoRA-Drop ===" if mode == "lora-drop" else f"=== LoRA-Drop, {mode} ===")
    print(dropped["text"])
    log_mode_stats(dropped, log)
    log(f"{'':12} {'tok/s':>8} {'KV MiB':>8}")
    log(f"{'plain':12} {plain['decode_tokens_per_s']:8.1f} {plain['kv_bytes'] / 2**20:8.2f}")
    log(f"{'LoRA-Drop':12} {dropped['decode_tokens_per_s']:8.1f} {dropped['kv_bytes'] / 2**20:8.2f}")
    log(
        f"speedup {summary['speedup']:.2f}x, KV cache {100 * summary['kv_reduction']:.1f}% smaller, "
        f"{100 * summary['lora_step_share']:.1f}% of decode steps were LoRA steps, "
        f"{100 * summary['agreement']:.1f}% of tokens equal to the plain model's"
    )
    if args.json:
        print(json.dumps(summary))
    return summary


def run_cli(main_function):
    """Run a script's main(); print the errors bad input raises as one line and exit with status 1."""
    try:
        main_function()
    except (ValueError, FileNotFoundError, pretrained.DefaultModelUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
