"""
Train the LoRA-Drop correctors of a frozen model by distillation.

    python train_correctors.py                          # embedded SmolLM2-135M-Instruct, CPU, self-generated data
    python generate.py --ckpt checkpoints/smollm2-135m-instruct.safetensors
    python train_correctors.py --steps 20 --eval-every 10            # a quick check that the loss falls
    python train_correctors.py --resume                 # continue a stopped run (Ctrl-C saves first)
    python train_correctors.py --data corpus.jsonl --out checkpoints/corpus.safetensors
    python train_correctors.py --period 4 --layers fraction:0.5 --reuse delta --out checkpoints/p4-half-delta.safetensors
    python train_correctors.py --device cuda --batch-size 32 --seq-len 256 --gen-rows 64 --steps 2000

The teacher is the model with every layer running on every position, `model(idx)`. The
student is the same frozen model under the LoRA-Drop schedule, `model.scheduled_forward`,
which gives exactly the logits that prefill plus step-by-step decoding would give. Each
training sequence gets its own random prompt length P, so the refresh cycle starts at a
different position every time. The loss is KL(teacher || student) of the next-token
distributions at the decoded positions t >= P (at P - 1 both come from prefill and are
equal), optionally plus a hidden-state term (--hidden-weight). Only the correctors train.

Training data is, by default, text the model generates itself from the built-in seed
prompts (SEED_PROMPTS in this file), sampled in the chat format and cached as token ids in
$LORA_DROP_CACHE (or ~/.cache/lora-drop), so a rerun does not generate it again.
--data FILE uses a text file instead. Every tenth prompt (or every tenth window of --data)
is held out, and evaluations compare the trained correctors with zero correctors and with
plain layer skipping at the same schedule.

With no arguments the script samples 384 sequences (24 prompts x 16 rows, about 31,000
new tokens) and trains 200 steps of 4 sequences of 128 tokens. On an idle 2-core CPU that
took 18 min 50 s end to end: 5 min 48 s to generate the data, then about 3.4 s per step.

NOTE: on SmolLM2-135M the default schedule (22 of 30 layers dropped, period 8) stays far
from the full model even with trained correctors. In the default run the held-out KL fell
from 7.31 nats per token (zero correctors) to 4.73, and top-1 agreement with the full model
went from 4.8% to 7.2%.

Progress and evaluations go to stderr. The correctors are saved with
lora_drop.save_correctors to --out, and the optimizer state for --resume to a file next
to it (<out without .safetensors>.train-state.pt). With --json the last stdout line is
one JSON summary object.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time

import torch

import lora_drop
from generate import DTYPES, pick_device
from lora_drop import LoRADrop, Schedule, sample_next

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "checkpoints", "smollm2-135m-instruct.safetensors")
STATE_FORMAT = "lora-drop-train-state/1"
SELFGEN_FORMAT = "lora-drop-selfgen/1"
HELD_OUT_EVERY = 10  # every 10th prompt (self-generated data) or window (--data) is held out for evaluation
WARMUP_SHARE = 0.1  # share of the steps with a linear learning-rate warm-up
MIN_LR_SHARE = 0.1  # the cosine decay ends at this share of --lr
GRAD_CLIP = 1.0  # maximum gradient norm, a guard against one large step throwing the correctors off

# Options that must be equal when a run is resumed, because they fix the correctors' shapes, the
# data and the optimisation. --steps may change, and the cosine schedule then follows the new total.
RESUME_KEYS = ("model", "period", "layers", "reuse", "rank", "alpha", "seq_len", "batch_size", "lr", "seed",
               "data", "hidden_weight", "dtype", "gen_prompts", "gen_rows", "temperature", "top_p")

# Seed prompts for self-generated training data, ordered so that the held-out ones (every 10th,
# counting from the 10th) come from different topics. Each one requests a long response, so that most
# samples fill a training sequence.
SEED_PROMPTS = [
    "Explain how photosynthesis turns sunlight into chemical energy in plants.",
    "Tell me about the causes and consequences of the fall of the Western Roman Empire.",
    "Give me a step-by-step recipe for a vegetable lasagna, with tips for each step.",
    "Write a Python function that checks whether a string is a palindrome, and explain how it works.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "How do I change a flat tire on a car? Describe each step.",
    "A train leaves at 3 pm and travels 240 km at 80 km per hour. When does it arrive? Explain your reasoning.",
    "What are the main differences between a virus and a bacterium?",
    "Describe the water cycle and why it matters for life on Earth.",
    "Why did the printing press change European society so much?",
    "How do I bake sourdough bread at home? Explain the starter, the dough and the baking.",
    "Explain what a hash table is, how collisions are handled, and when to use one.",
    "Write a fairy tale about a fox who wants to learn to fly.",
    "How can I start running if I have never exercised before? Give me a four-week plan.",
    "A shop sells pencils at 3 for 1 dollar. How much do 27 pencils cost, and how many can I buy with 5 dollars?",
    "Explain how vaccines train the immune system.",
    "What causes the seasons on Earth? Many people think it is the distance to the Sun; explain why that is wrong.",
    "Summarize the main events of the French Revolution.",
    "What is the difference between baking soda and baking powder, and how do they make cakes rise?",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a poem about the sea at night, then explain the images you used.",
    "How do I write a good cover letter for a job application?",
    "If a rectangle has a perimeter of 30 cm and its length is twice its width, what are its sides? Show the steps.",
    "Describe how the human heart pumps blood through the body.",
    "Explain plate tectonics and how it causes earthquakes and volcanoes.",
    "Tell me about the life and discoveries of Marie Curie.",
    "How do I make a simple tomato sauce from fresh tomatoes?",
    "Explain recursion to a beginner programmer, with an example in JavaScript.",
    "Write a story about two friends who get lost in a forest and find their way home.",
    "How can I organize my week to study better for exams?",
    "A tank holds 500 liters and leaks 12 liters per hour. How long until it is a quarter full? Explain.",
    "What is DNA, and how does it store genetic information?",
    "Why is the sky blue during the day and red at sunset?",
    "What was the Silk Road, and why was it important for trade and culture?",
    "How should I store fresh vegetables and fruit so they last longer?",
    "Explain what SQL joins are, with an example of an inner join and a left join.",
    "Write a dialogue between a robot and a child who meet for the first time.",
    "How do I plant and care for tomato plants in a small garden?",
    "Sara is three times as old as her brother. In five years she will be twice as old. How old are they now?",
    "Explain how electric motors work.",
    "How do black holes form, and what happens near the event horizon?",
    "Describe the building of the pyramids of Giza and what we know about the workers.",
    "Give me a weekly meal plan for a family on a budget, with a shopping list.",
    "What are the pros and cons of using Git branches, and how does a merge work?",
    "Write a short mystery story set on a night train.",
    "How do I prepare for a job interview? List the most important steps.",
    "Explain what percentages are and how to compute a 15 percent discount on 80 dollars.",
    "How does the internet send a message from one computer to another?",
]


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file, Hugging Face directory or model id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None, help="cache for the embedded model and the self-generated data (default: $LORA_DROP_CACHE or ~/.cache/lora-drop)")
    p.add_argument("--out", default=None, help="corrector checkpoint to write, a .safetensors file (default: checkpoints/smollm2-135m-instruct.safetensors "
                   "next to this script; required with --model)")
    p.add_argument("--resume", action="store_true", help="continue the run whose training state is saved next to --out")

    s = p.add_argument_group("schedule")
    s.add_argument("--period", type=int, default=8, help="refresh period k in decode steps: every k-th step runs all layers (default: %(default)s)")
    s.add_argument("--layers", default="default", help="droppable layers: 'default' (all but layer 0 and every 4th), a list such as '1,2,5', "
                   "'stride:S' or 'fraction:F' (default: %(default)s)")
    s.add_argument("--reuse", default="state", choices=lora_drop.REUSE_RULES, help="what a dropped layer reuses from its anchor: "
                   "its output (state), its residual update (delta), or nothing (none) (default: %(default)s)")

    c = p.add_argument_group("corrector")
    c.add_argument("--rank", type=int, default=8, help="rank of each corrector (default: %(default)s)")
    c.add_argument("--alpha", type=float, default=16.0, help="corrector scale numerator: output = B(A(x)) * alpha / rank (default: %(default)s)")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps in total (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence (default: %(default)s)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate, after a warm-up of 10%% of the steps, "
                   "then cosine decay to a tenth (default: %(default)s)")
    t.add_argument("--hidden-weight", type=float, default=0.0, help="weight of a hidden-state loss on droppable layers' outputs, "
                   "the squared error divided by the teacher's variance over positions; 0 turns it off (default: %(default)s)")
    t.add_argument("--seed", type=int, default=1337, help="random seed for corrector initialisation, data sampling and batches (default: %(default)s)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu")
    t.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="type of the weights, activations, correctors and "
                   "optimizer state; bfloat16 and float16 make the corrector updates coarse (default: %(default)s)")
    t.add_argument("--eval-every", type=int, default=50, help="evaluate on held-out data every this many steps; 0 evaluates only "
                   "at the start and end (default: %(default)s)")
    t.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences per evaluation (default: %(default)s)")
    t.add_argument("--save-every", type=int, default=50, help="save the checkpoint and training state every this many steps; "
                   "0 saves only at the end or on Ctrl-C (default: %(default)s)")
    t.add_argument("--json", action="store_true", help="print one JSON summary object as the last stdout line")

    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="UTF-8 text file to train on instead of self-generated text: plain text, or JSON lines "
                   "with a \"text\" field (a file whose first non-empty line is a JSON object is read as JSON lines)")
    d.add_argument("--gen-prompts", type=int, default=24, help="self-generated data: how many of the built-in seed "
                   f"prompts to use, in their order, at most {len(SEED_PROMPTS)} (default: %(default)s)")
    d.add_argument("--gen-rows", type=int, default=16, help="self-generated data: sequences sampled per seed prompt, in one batched "
                   "decode (default: %(default)s)")
    d.add_argument("--temperature", type=float, default=1.0, help="self-generated data: sampling temperature, > 0 (default: %(default)s)")
    d.add_argument("--top-p", type=float, default=0.95, help="self-generated data: nucleus sampling probability mass, in (0, 1] (default: %(default)s)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.out is None:
        if args.model is not None:
            p.error("--model needs --out PATH, so that correctors for another model do not overwrite the default checkpoint")
        args.out = DEFAULT_OUT
    try:
        check_args(args)
    except ValueError as err:
        p.error(str(err))
    return args


def check_args(args):
    """Raise ValueError naming the first option whose value is invalid."""
    positive = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank,
                "eval_sequences": args.eval_sequences, "gen_prompts": args.gen_prompts, "gen_rows": args.gen_rows}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"invalid --{name.replace('_', '-')} {value}: it must be an integer >= 1")
    for name in ("eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: it must be >= 0 (0 turns it off)")
    if args.period < 1:
        raise ValueError(f"invalid --period {args.period}: it must be an integer >= 1")
    if args.seq_len <= args.period:
        raise ValueError(f"--seq-len {args.seq_len} must be larger than --period {args.period}, so that a sequence "
                         "contains a whole refresh cycle of decoded positions")
    if not args.lr > 0:
        raise ValueError(f"invalid --lr {args.lr}: it must be > 0")
    if not args.alpha > 0:
        raise ValueError(f"invalid --alpha {args.alpha}: it must be > 0")
    if not args.hidden_weight >= 0:
        raise ValueError(f"invalid --hidden-weight {args.hidden_weight}: it must be >= 0")
    if not args.temperature > 0:
        raise ValueError(f"invalid --temperature {args.temperature}: it must be > 0, because greedy decoding would "
                         "give every row of a prompt the same text")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"invalid --top-p {args.top_p}: it must be in (0, 1]")
    if args.gen_prompts > len(SEED_PROMPTS):
        raise ValueError(f"invalid --gen-prompts {args.gen_prompts}: there are {len(SEED_PROMPTS)} seed prompts")
    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"invalid --out {args.out!r}: the corrector checkpoint must be a .safetensors file")


# -----------------------------------------------------------------------------
# Training data: token windows of seq_len + 1 tokens (inputs plus the next-token targets)


def read_documents(path):
    """Return the texts of a data file: the whole file for plain text, one text per JSON line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training data file not found: {path}; check --data")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); give a UTF-8 plain text or JSON lines file") from None
    if not text.strip():
        raise ValueError(f"training data file {path} is empty; give a plain text or JSON lines file with text in it")

    lines = text.splitlines()
    first = next(line for line in lines if line.strip())
    try:
        is_json_lines = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        is_json_lines = False
    if not is_json_lines:
        return [text]

    documents = []
    hint = 'the first non-empty line is a JSON object, so every non-empty line must be a JSON object with a string "text" field'
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: invalid JSON ({err.msg}); {hint}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f'{path} line {number}: no "text" field; {hint}')
        if not isinstance(record["text"], str):
            raise ValueError(f'{path} line {number}: "text" is a {type(record["text"]).__name__}, not a string; {hint}')
        documents.append(record["text"])
    return documents


def tokenize_file(path, tokenizer, seq_len):
    """Tokenize a data file into windows (N, seq_len + 1); return (windows, groups), groups[i] = i.

    JSON lines documents are joined with a blank line between them. The tail that does not
    fill a window is dropped.
    """
    ids = tokenizer.encode("\n\n".join(read_documents(path)))
    n_windows = len(ids) // (seq_len + 1)
    if n_windows < 2:
        raise ValueError(
            f"{path} has {len(ids)} tokens, fewer than the {2 * (seq_len + 1)} needed for one training and one held-out "
            f"sequence of --seq-len {seq_len} tokens plus a target; give more text or lower --seq-len"
        )
    windows = torch.tensor(ids[: n_windows * (seq_len + 1)], dtype=torch.long).view(n_windows, seq_len + 1)
    return windows, torch.arange(n_windows)


def chat_prompt_ids(tokenizer, prompt):
    if getattr(tokenizer, "has_chat_template", True):
        return tokenizer.apply_chat_template(prompt)
    return tokenizer.encode(prompt)


@torch.no_grad()
def sample_rows(model, prompt_ids, n_rows, n_new, temperature, top_p, banned_ids, generator):
    """Sample n_rows continuations of one prompt in a single batched decode; return (n_rows, P + n_new) ids.

    All rows share the prompt, so they share one prompt length and need no padding. Tokens in
    banned_ids (the end-of-sequence ids) are never sampled, so every row has n_new tokens.
    NOTE: a reply that would have ended continues with what the model writes when it cannot stop.
    That text is less typical than a reply, but it is still the model's own output.
    """
    device = model.tok_emb.weight.device
    idx = torch.tensor(prompt_ids, dtype=torch.long, device=device).expand(n_rows, -1)  # (n_rows, P)
    cache = model.new_cache(n_rows, len(prompt_ids) + n_new - 1)  # the last token is never fed back
    logits = model.prefill(idx, cache)
    tokens = [idx]
    for j in range(n_new):
        logits[:, banned_ids] = float("-inf")
        token = sample_next(logits, temperature, top_p=top_p, generator=generator)  # (n_rows, 1)
        tokens.append(token)
        if j < n_new - 1:
            logits = model.decode_step(token, cache)
    return torch.cat(tokens, dim=1).cpu()


def default_cache_dir(cache_dir=None):
    """Return cache_dir, else $LORA_DROP_CACHE, else ~/.cache/lora-drop: the rule pretrained.py uses for the model."""
    if cache_dir is not None:
        return os.path.expanduser(cache_dir)
    return os.path.expanduser(os.environ.get("LORA_DROP_CACHE") or os.path.join("~", ".cache", "lora-drop"))


def save_atomically(obj, path):
    """torch.save to a temporary file in the same folder, then rename it over `path`.

    Readers see the old file or the new one, never a partial write, even when saving fails midway.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file readable by its owner only
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def self_generated_data(model, tokenizer, args, log):
    """Sample training windows from the model itself; return (windows, groups) with groups = prompt index.

    Each window is one chat-formatted seed prompt plus seq_len + 1 - P sampled tokens. Prompts
    whose chat form takes more than half of a window are skipped. The result is cached on disk
    under a hash of everything that determines it.
    """
    T = args.seq_len
    prompts = [(i, chat_prompt_ids(tokenizer, text)) for i, text in enumerate(SEED_PROMPTS[: args.gen_prompts])]
    usable = [(i, ids) for i, ids in prompts if len(ids) <= T // 2]
    if len(usable) < 2:
        raise ValueError(
            f"only {len(usable)} of {len(prompts)} seed prompts fit in half of a --seq-len {T} sequence in the chat "
            "format, and training plus evaluation need at least 2; raise --seq-len or --gen-prompts"
        )
    if len(usable) < len(prompts):
        log(f"note: {len(prompts) - len(usable)} seed prompts are longer than half of --seq-len {T} and were skipped")

    p = model.tok_emb.weight
    key = {
        "format": SELFGEN_FORMAT,
        "model": lora_drop.weights_fingerprint(model),
        "device": p.device.type,
        "dtype": str(p.dtype),
        "prompts": [ids for _, ids in usable],
        "rows": args.gen_rows,
        "seq_len": T,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "banned": sorted(int(i) for i in tokenizer.eos_ids),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(default_cache_dir(args.cache_dir), f"selfgen-{digest}.pt")
    n_rows = len(usable) * args.gen_rows
    if os.path.isfile(path):
        try:
            cached = torch.load(path, weights_only=True)
            windows, groups = cached["windows"], cached["groups"]
            if cached.get("format") == SELFGEN_FORMAT and tuple(windows.shape) == (n_rows, T + 1) and len(groups) == n_rows:
                log(f"self-generated data: {n_rows} sequences from the cache {path}")
                return windows.long(), groups.long()
            log(f"warning: the cached data {path} has unexpected contents; generating it again")
        except Exception as err:  # torch.load raises several types for truncated or foreign files
            log(f"warning: cannot read the cached data {path} ({type(err).__name__}: {err}); generating it again")

    from tqdm import tqdm

    n_new = sum(T + 1 - len(ids) for _, ids in usable)
    log(f"self-generated data: sampling {args.gen_rows} rows for each of {len(usable)} seed prompts, "
        f"{n_new} decode steps in all (temperature {args.temperature}, top-p {args.top_p}); caching them in {path}")
    generator = torch.Generator(device=p.device).manual_seed(args.seed)
    banned = sorted(int(i) for i in tokenizer.eos_ids)
    windows, groups, n_sampled = [], [], 0
    start = time.perf_counter()
    bar = tqdm(usable, desc="generate", unit="prompt", file=sys.stderr, dynamic_ncols=True)
    for i, ids in bar:
        windows.append(sample_rows(model, ids, args.gen_rows, T + 1 - len(ids), args.temperature, args.top_p, banned, generator))
        groups.append(torch.full((args.gen_rows,), i, dtype=torch.long))
        n_sampled += (T + 1 - len(ids)) * args.gen_rows
        bar.set_postfix_str(f"{n_sampled / (time.perf_counter() - start):.0f} tok/s")
    bar.close()
    windows, groups = torch.cat(windows), torch.cat(groups)
    save_atomically({"format": SELFGEN_FORMAT, "key": json.dumps(key), "windows": windows, "groups": groups}, path)
    return windows, groups


def split_held_out(windows, groups):
    """Split windows into (train, held_out) by group: every HELD_OUT_EVERY-th group is held out.

    With fewer than HELD_OUT_EVERY groups, the last group is held out instead.
    """
    is_held_out = groups % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    if not is_held_out.any():
        is_held_out = groups == groups.max()
    if is_held_out.all():
        raise ValueError("the data has a single group of sequences, so none is left to train on after holding out "
                         "the evaluation data; give more data")
    return windows[~is_held_out], windows[is_held_out]


# -----------------------------------------------------------------------------
# Loss and evaluation


def prompt_len_range(seq_len, period):
    """Return the smallest and largest prompt length drawn in training.

    The prompt has at least seq_len // 8 tokens, because with a prompt of a few tokens the anchors
    sit on the first positions, whose hidden states are atypical in many models. At least one
    refresh cycle of positions is decoded.
    """
    low = max(1, seq_len // 8)
    return low, max(low, seq_len - period)


def sample_prompt_lens(n, seq_len, period, generator):
    """Draw a (n,) tensor of prompt lengths, uniformly in prompt_len_range."""
    low, high = prompt_len_range(seq_len, period)
    return torch.randint(low, high + 1, (n,), generator=generator)


def evaluation_prompt_lens(seq_len):
    """Fixed prompt lengths for evaluation, cycled over the rows: four, from seq_len/4 to seq_len/2.

    With a fixed prompt length every decode step still meets every phase of the refresh
    cycle, and fixed lengths keep evaluations of one run, or of runs with one seq_len,
    comparable.
    """
    return sorted({max(1, round(seq_len / 4 + j * seq_len / 12)) for j in range(4)})


def row_prompt_lens(prompt_len, n_rows, seq_len, device):
    """Expand an int or a list of ints (cycled over the rows) to a (n_rows,) tensor."""
    lens = torch.as_tensor(prompt_len, dtype=torch.long).reshape(-1)
    if lens.numel() == 0:
        raise ValueError("prompt_len is empty; give an int or a list of ints")
    bad = lens[(lens < 1) | (lens >= seq_len)]
    if bad.numel():
        raise ValueError(f"invalid prompt length {int(bad[0])} for sequences of {seq_len} tokens: it must be in "
                         f"1..{seq_len - 1}, so that at least one position is decoded")
    return lens.repeat(math.ceil(n_rows / lens.numel()))[:n_rows].to(device)


def decoded_positions(prompt_len, seq_len):
    """(B, T) bool mask of the decoded positions t >= P of each row."""
    return torch.arange(seq_len, device=prompt_len.device)[None] >= prompt_len[:, None]


def kl_per_token(teacher_logp, student_logp):
    """KL(teacher || student) in nats for each row of two (N, vocab) log-probability tensors."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def distillation_loss(model, drop, inputs, prompt_len, hidden_weight=0.0):
    """Return (loss, KL, hidden-state loss) of the student on inputs (B, T); the last two are detached.

    KL is the mean of KL(teacher || student) over the decoded positions. The hidden-state term,
    only computed when hidden_weight > 0, is the mean over droppable layers of the squared
    error of the layer's output at decoded positions, divided by the teacher's variance there.
    """
    mask = decoded_positions(prompt_len, inputs.size(1))
    if hidden_weight > 0:
        with torch.no_grad():
            teacher, teacher_hidden = model.scheduled_forward(inputs, prompt_len, None, return_hidden=True)
        student, student_hidden = model.scheduled_forward(inputs, prompt_len, drop, return_hidden=True)
    else:
        with torch.no_grad():
            teacher = model(inputs)
        student = model.scheduled_forward(inputs, prompt_len, drop)
    teacher_logp = teacher[mask].float().log_softmax(-1)  # (N, vocab), N decoded positions
    student_logp = student[mask].float().log_softmax(-1)
    kl = kl_per_token(teacher_logp, student_logp).mean()
    loss, hidden_loss = kl, torch.zeros((), device=kl.device)
    if hidden_weight > 0:
        for i in drop.schedule.layers:
            target = teacher_hidden[i][mask].float()  # (N, n_embd)
            error = (student_hidden[i][mask].float() - target).pow(2).mean()
            # Divide by the variance over positions, not the mean square: a few channels of the
            # residual stream carry large values that barely change from token to token.
            hidden_loss = hidden_loss + error / target.var(dim=0, unbiased=False).mean().clamp_min(1e-12)
        hidden_loss = hidden_loss / max(1, len(drop.schedule.layers))
        loss = loss + hidden_weight * hidden_loss
    return loss, kl.detach(), hidden_loss.detach()


@torch.no_grad()
def evaluate_many(model, drops, batches, prompt_len):
    """Evaluate several LoRADrops (a dict name -> drop) on the same batches; one teacher pass per batch.

    Returns {name: metrics} with the metrics of `evaluate`.
    """
    device = model.tok_emb.weight.device
    totals = {name: {"kl": 0.0, "agree": 0, "nll": 0.0} for name in drops}
    teacher_nll, n_tokens = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        lens = row_prompt_lens(prompt_len, inputs.size(0), inputs.size(1), device)
        mask = decoded_positions(lens, inputs.size(1))
        target = targets[mask][:, None]  # (N, 1)
        teacher_logp = model(inputs)[mask].float().log_softmax(-1)  # (N, vocab)
        teacher_top1 = teacher_logp.argmax(-1)
        teacher_nll -= teacher_logp.gather(1, target).sum().item()
        n_tokens += target.size(0)
        for name, drop in drops.items():
            student_logp = model.scheduled_forward(inputs, lens, drop)[mask].float().log_softmax(-1)
            totals[name]["kl"] += kl_per_token(teacher_logp, student_logp).sum().item()
            totals[name]["agree"] += (student_logp.argmax(-1) == teacher_top1).sum().item()
            totals[name]["nll"] -= student_logp.gather(1, target).sum().item()
    if n_tokens == 0:
        raise ValueError("no evaluation batches were given")
    return {
        name: {
            "kl": t["kl"] / n_tokens,
            "top1": t["agree"] / n_tokens,
            "ppl": math.exp(t["nll"] / n_tokens),
            "full_ppl": math.exp(teacher_nll / n_tokens),
            "tokens": n_tokens,
        }
        for name, t in totals.items()
    }


def evaluate(model, drop, batches, prompt_len):
    """Teacher-forced quality of LoRA-Drop decoding on held-out token windows.

    batches: iterable of (B, T + 1) token tensors; each row's first T tokens are fed and the
    last T are the next-token targets. prompt_len: an int, or a list of ints cycled over the
    rows of each batch; positions t >= prompt_len are decoded under the schedule and scored.
    Returns a dict: "kl", the mean KL(full model || LoRA-Drop) in nats per token; "top1", the
    share of positions where both pick the same most likely token; "ppl" and "full_ppl", the
    perplexity of the data's next tokens under LoRA-Drop and under the full model; "tokens",
    the number of positions scored.
    """
    return evaluate_many(model, {"drop": drop}, batches, prompt_len)["drop"]


def evaluation_batches(held_out, n_sequences, batch_size):
    """Pick n_sequences held-out windows, evenly spaced so that every held-out prompt is represented,
    and split them into batches of batch_size."""
    picked = held_out[:: max(1, len(held_out) // n_sequences)][:n_sequences]
    return list(picked.split(batch_size))


def format_evaluation(step, results):
    trained, zero, skip = results["trained"], results["zero_correctors"], results["plain_skipping"]
    return (
        f"step {step}: KL {trained['kl']:.4f} (zero correctors {zero['kl']:.4f}, plain skipping {skip['kl']:.4f}) | "
        f"top-1 {100 * trained['top1']:.1f}% ({100 * zero['top1']:.1f}%, {100 * skip['top1']:.1f}%) | "
        f"ppl {trained['ppl']:.2f} ({zero['ppl']:.2f}, {skip['ppl']:.2f}; full model {trained['full_ppl']:.2f})"
    )


# -----------------------------------------------------------------------------
# Optimisation, checkpoints and training state


def learning_rate(step, total_steps, peak):
    """Linear warm-up over WARMUP_SHARE of the steps, then cosine decay to MIN_LR_SHARE * peak."""
    warmup = max(1, round(WARMUP_SHARE * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_state_path(out):
    """Path of the training state for --resume: next to the checkpoint, ending in .train-state.pt."""
    return os.path.splitext(out)[0] + ".train-state.pt"


def data_fingerprint(windows):
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def save_run(args, drop, model, model_name, optimizer, generator, step, data_hash):
    """Write the corrector checkpoint and the training state, each atomically.

    The training state also contains the correctors, so a resume never pairs an optimizer state
    with correctors from another step, even if a crash falls between the two writes.
    """
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    lora_drop.save_correctors(args.out, drop, model, model_name)
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "correctors": {k: v.detach().cpu() for k, v in drop.correctors.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "args": {key: getattr(args, key) for key in RESUME_KEYS + ("steps",)},
        "data": data_hash,
    }
    save_atomically(state, training_state_path(args.out))


def load_run(args, drop, optimizer, generator, data_hash):
    """Restore correctors, optimizer and batch sampler from the training state; return the step to continue at."""
    path = training_state_path(args.out)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training state to resume from at {path}; run without --resume to start a new run")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch.load raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable training state ({err}); run without --resume to start again") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a lora-drop training state; run without --resume to start again")
    for key in RESUME_KEYS:
        saved, requested = state["args"].get(key), getattr(args, key)
        if saved != requested:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"{option} {requested!r} differs from the run being resumed ({saved!r}); pass {option} {saved!r}, "
                             "or start a new run without --resume")
    if state["data"] != data_hash:
        raise ValueError(f"the training data differs from the data of the run being resumed ({path}); "
                         "use the same data, or start a new run without --resume")
    drop.correctors.load_state_dict(state["correctors"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"], state["args"]["steps"]


# -----------------------------------------------------------------------------
# Training


def load_windows(model, tokenizer, args, log):
    """Return (training windows, held-out windows, evaluation batches) from --data or self-generated text."""
    if args.data is not None:
        windows, groups = tokenize_file(args.data, tokenizer, args.seq_len)
        if int(windows.max()) >= model.config.vocab_size:
            raise ValueError(f"the tokenizer produced id {int(windows.max())}, outside the model's vocabulary of "
                             f"{model.config.vocab_size}; use the model's own tokenizer")
    else:
        windows, groups = self_generated_data(model, tokenizer, args, log)
    train_windows, held_out = split_held_out(windows, groups)
    return train_windows, held_out, evaluation_batches(held_out, args.eval_sequences, args.batch_size)


def train(model, tokenizer, args, model_name="", log=None):
    """Distill the correctors of a frozen `model` with the options in `args` (see parse_args).

    Writes the checkpoint and training state, and returns a summary dict (the --json output).
    On KeyboardInterrupt it saves the last completed step, then raises it again.
    """
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    t_begin = time.perf_counter()
    check_args(args)
    device, dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
    T = args.seq_len
    if T > model.config.max_seq_len:
        raise ValueError(f"--seq-len {T} is longer than the model's context of {model.config.max_seq_len} tokens; lower it")
    model.eval()
    model.requires_grad_(False)

    schedule = Schedule.make(model.config.n_layer, args.layers, args.period, args.reuse)
    torch.manual_seed(args.seed)
    drop = LoRADrop(model.config, schedule, args.rank, args.alpha).to(device, dtype)
    baselines = {
        "zero_correctors": LoRADrop(model.config, schedule, args.rank, args.alpha).to(device, dtype),
        "plain_skipping": LoRADrop(model.config, Schedule(schedule.layers, schedule.period, "none")).to(device, dtype),
    }
    train_windows, held_out, eval_batches = load_windows(model, tokenizer, args, log)
    n_eval = sum(len(b) for b in eval_batches)
    eval_lens = evaluation_prompt_lens(T)
    data_hash = data_fingerprint(train_windows)

    # AdamW without weight decay, because decay would pull the correctors towards zero, which is
    # the uncorrected baseline. The held-out evaluation shows whether they overfit. Only the
    # correctors are given to the optimizer. On SmolLM2-135M a peak learning rate of 1e-2
    # diverged within 40 steps, while 3e-3 and 5e-3 reached the same held-out KL, so the
    # default 2e-3 keeps a factor 5 from divergence.
    optimizer = torch.optim.AdamW(drop.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)  # draws the batches and prompt lengths
    step = 0
    if args.resume:
        step, saved_steps = load_run(args, drop, optimizer, generator, data_hash)
        if saved_steps != args.steps:
            log(f"note: --steps changed from {saved_steps} to {args.steps}; the learning-rate schedule follows the new total")
        log(f"resuming at step {step} of {args.steps} from {training_state_path(args.out)}")

    n_params = sum(p.numel() for p in drop.parameters())
    log(f"LoRA-Drop: {len(schedule.layers)} of {model.config.n_layer} layers droppable, period {schedule.period}, "
        f"reuse {schedule.reuse}; {len(drop.correctors)} correctors of rank {args.rank}, {n_params:,} parameters")
    log(f"data: {len(train_windows)} training and {len(held_out)} held-out sequences of {T} tokens; "
        f"each evaluation uses {n_eval} held-out sequences with prompt lengths {eval_lens}")

    def evaluate_current():
        return {**evaluate_many(model, {"trained": drop}, eval_batches, eval_lens), **baseline_results}

    baseline_results = evaluate_many(model, baselines, eval_batches, eval_lens)
    if step == 0:  # untrained correctors are zero correctors
        results = {"trained": baseline_results["zero_correctors"], **baseline_results}
    else:
        results = evaluate_current()
    history = [{"step": step, **results}]
    log(format_evaluation(step, results))

    start_step, losses = step, []
    updating = False
    sampler_state = generator.get_state()
    t_start = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="distill", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        while step < args.steps:
            sampler_state = generator.get_state()  # restored on Ctrl-C, so a resume draws this step's batch again
            rows = torch.randint(len(train_windows), (args.batch_size,), generator=generator)
            lens = sample_prompt_lens(args.batch_size, T, args.period, generator).to(device)
            batch = train_windows[rows].to(device)
            lr = learning_rate(step, args.steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss, kl, hidden_loss = distillation_loss(model, drop, batch[:, :-1], lens, args.hidden_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(drop.parameters(), GRAD_CLIP)
            updating = True
            optimizer.step()
            step += 1
            updating = False

            losses.append(loss.item())
            tokens_per_s = (step - start_step) * args.batch_size * T / (time.perf_counter() - t_start)
            postfix = f"loss {losses[-1]:.4f}, KL {kl.item():.4f}, lr {lr:.1e}, {tokens_per_s:.0f} tok/s"
            if args.hidden_weight > 0:
                postfix += f", hidden {hidden_loss.item():.4f}"
            bar.set_postfix_str(postfix)
            bar.update(1)
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                results = evaluate_current()
                history.append({"step": step, **results})
                log(format_evaluation(step, results))
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save_run(args, drop, model, model_name, optimizer, generator, step, data_hash)
    except KeyboardInterrupt:
        bar.close()
        if updating:
            log(f"interrupted during an optimizer update, so nothing was saved; the last saved state in {args.out} is kept")
        else:
            generator.set_state(sampler_state)
            save_run(args, drop, model, model_name, optimizer, generator, step, data_hash)
            log(f"interrupted at step {step}: saved {args.out} and {training_state_path(args.out)}; continue with --resume")
        raise
    bar.close()
    train_seconds = time.perf_counter() - t_start

    save_run(args, drop, model, model_name, optimizer, generator, step, data_hash)
    results = evaluate_current()
    if history[-1]["step"] != step:
        history.append({"step": step, **results})
    log(format_evaluation(step, results))
    log(f"saved {args.out}; training state in {training_state_path(args.out)}")
    trained_steps = step - start_step
    return {
        "out": args.out,
        "steps": step,
        "trained_steps": trained_steps,
        "seconds": time.perf_counter() - t_begin,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / trained_steps if trained_steps else None,
        "train_tokens_per_s": trained_steps * args.batch_size * T / train_seconds if trained_steps else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "schedule": {"layers": list(schedule.layers), "period": schedule.period, "reuse": schedule.reuse},
        "data": {"train_sequences": len(train_windows), "held_out_sequences": len(held_out), "eval_sequences": n_eval,
                 "seq_len": T},
        "eval": results,
        "history": history,
    }


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)

    import pretrained

    model, tokenizer = pretrained.load_model(args.model, device=device, dtype=DTYPES[args.dtype], cache_dir=args.cache_dir)
    summary = train(model, tokenizer, args, model_name=args.model or pretrained.DEFAULT_GGUF_NAME)
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
