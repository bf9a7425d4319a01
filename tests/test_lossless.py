"""Tests for lossless.py: LoRA steps draft, the full model verifies, and the output is the full model's.

    python -m pytest tests/test_lossless.py -q

Tiny random models are built from fixed seeds. One test decodes with the embedded SmolLM2
model (the `smollm` session fixture in conftest.py).
"""

import itertools
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402
import generate as gen  # noqa: E402
import lora_drop  # noqa: E402
import lossless  # noqa: E402
import pretrained  # noqa: E402
from lora_drop import GPT, Config, LoRADrop, Schedule, generate, sample_next  # noqa: E402
from lossless import LosslessStats, accept_drafts, generate_lossless, run_prompt_suite, sampling_probs  # noqa: E402

VOCAB = 97
FAMILIES = {"gpt2": dict(arch="gpt2"), "llama": dict(arch="llama", n_kv_head=2)}

pytestmark = pytest.mark.usefixtures("one_thread", "no_grad")


def tiny_model(family="llama", seed=0, vocab=VOCAB, n_layer=6, n_embd=64, n_head=4, max_seq_len=128, std=0.08):
    """A small model with random weights, in eval mode.

    The default init (std 0.02) leaves every layer close to the identity, so a wrong cache or
    schedule would barely move the logits. With std 0.08 each layer matters.
    """
    torch.manual_seed(seed)
    config = Config(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd, max_seq_len=max_seq_len,
                    **FAMILIES[family])
    model = GPT(config)
    for param in model.parameters():
        if param.dim() >= 2:
            param.normal_(0.0, std)
        else:
            param.add_(torch.randn_like(param), alpha=0.1)
    return model.eval()


def random_drop(model, period, reuse="state", layers=None, seed=1, scale=0.1):
    """A LoRADrop whose correctors have random non-zero B matrices, so that drafts are often wrong."""
    drop = LoRADrop(model.config, Schedule.make(model.config.n_layer, layers, period, reuse), rank=4)
    generator = torch.Generator().manual_seed(seed)
    for corrector in drop.correctors.values():
        corrector.B.weight.copy_(torch.randn(corrector.B.weight.shape, generator=generator) * scale)
    return drop


def random_prompt(length, seed, vocab=VOCAB):
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def record_cycles(monkeypatch, drafts_out=None):
    """Wrap lossless.accept_drafts; return the list it fills with (accepted, drafted) per cycle.

    drafts_out: an optional list that receives each cycle's drafts.
    """
    cycles = []
    original = lossless.accept_drafts

    def recording(drafts, *args, **kwargs):
        n_accepted, token = original(drafts, *args, **kwargs)
        cycles.append((n_accepted, len(drafts)))
        if drafts_out is not None:
            drafts_out.append(list(drafts))
        return n_accepted, token

    monkeypatch.setattr(lossless, "accept_drafts", recording)
    return cycles


# -----------------------------------------------------------------------------
# Greedy: the plain model's output and KV cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("period", [2, 3, 8])
@pytest.mark.parametrize("adaptive_drafts", [False, True], ids=["fixed-drafts", "adaptive-drafts"])
def test_greedy_equals_plain(family, period, adaptive_drafts, monkeypatch):
    model = tiny_model(family)
    drop = random_drop(model, period)
    cycles = record_cycles(monkeypatch)
    stats = LosslessStats()
    for seed, prompt_len in [(0, 1), (1, 5), (2, 12)]:
        prompt = random_prompt(prompt_len, seed)
        expected = list(generate(model, prompt, 40))
        ours = generate_lossless(model, prompt, 40, drop, stats=stats, adaptive_drafts=adaptive_drafts)
        assert list(ours) == expected, f"prompt {prompt}"

    assert stats.cycles == len(cycles)
    assert stats.drafted == sum(m for _, m in cycles)
    assert stats.accepted == sum(a for a, _ in cycles)
    assert any(a < m for a, m in cycles), "no draft was rejected, so the rejection path was not exercised"
    assert any(a == 0 for a, _ in cycles), "no cycle rejected its first draft"
    assert any(a > 0 for a, _ in cycles), "no draft was accepted"
    if period == 2:
        assert any(a == m for a, m in cycles), "no cycle accepted every draft, so no bonus token was taken"


@pytest.mark.parametrize("family", FAMILIES)
def test_drafts_equal_scheduled_forward(family, monkeypatch):
    """Each cycle drafts what LoRA-Drop decoding would after prefill on the accepted tokens.

    That holds only when the rollback leaves the full model's KV cache and the verification
    pass moves the anchors to the last accepted position.
    """
    model = tiny_model(family, seed=15)
    drop = random_drop(model, 4, reuse="delta", scale=0.02)
    drafts = []
    cycles = record_cycles(monkeypatch, drafts)
    prompt = random_prompt(5, seed=16)
    out = list(generate_lossless(model, prompt, 40, drop))

    n_emitted = 1
    for (n_accepted, _), cycle_drafts in zip(cycles, drafts):
        context = prompt + out[: n_emitted - 1]  # in the cache when the cycle starts
        fed = context + out[n_emitted - 1 : n_emitted] + cycle_drafts[:-1]
        logits = model.scheduled_forward(torch.tensor([fed]), len(context), drop)[0, len(context) :]
        assert logits.argmax(dim=-1).tolist() == cycle_drafts, f"cycle starting after {len(context)} positions"
        n_emitted += n_accepted + 1
    assert any(a > 0 for a, _ in cycles[:-1]), "no cycle before the last accepted a draft, so the anchors never moved"


@pytest.mark.parametrize("reuse", ["delta", "none"])
def test_greedy_equals_plain_other_reuse(reuse):
    model = tiny_model("llama", seed=3)
    drop = random_drop(model, 4, reuse=reuse, layers="1,3,4")
    prompt = random_prompt(6, seed=4)
    assert list(generate_lossless(model, prompt, 30, drop)) == list(generate(model, prompt, 30))


def test_draft_length_rule():
    lengths = lossless.DraftLength(3, max_backoff=4)
    seen = []

    def cycle(accepted):
        """Run one cycle that accepts min(accepted, drafted) drafts, and record its draft length."""
        n = lengths.next()
        seen.append(n)
        lengths.update(n, min(accepted, n))

    for _ in range(12):
        cycle(0)
    # The first draft fails. Then come waits of 1, 2, 4 and 4 (capped) cycles without drafts, each ending in a failed probe.
    assert seen == [1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    seen.clear()
    for _ in range(3):
        cycle(0)
    for _ in range(4):
        cycle(99)
    # The wait of 4 ends, the probe passes, and the length grows back to the maximum.
    assert seen == [0, 0, 0, 1, 2, 3, 3]
    cycle(1)
    cycle(0)
    cycle(0)
    # 3 drafts with 1 accepted leave 1. Its failure backs off for only 1 cycle, because the acceptances halved the backoff.
    assert seen[-3:] == [3, 1, 0]
    assert lengths.next() == 1


def test_draft_length_lucky_probe():
    lengths = lossless.DraftLength(1, max_backoff=8)
    for n_drafted in [1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1]:
        assert lengths.next() == n_drafted
        lengths.update(n_drafted, 0)
    assert lengths.backoff == 8
    assert lengths.wait == 8
    for _ in range(8):
        assert lengths.next() == 0
    assert lengths.next() == 1
    lengths.update(1, 1)  # a lucky probe: the next cycle drafts again
    assert lengths.next() == 1
    lengths.update(1, 0)  # its failure waits half the longest backoff, not one cycle
    assert [lengths.next() for _ in range(5)] == [0, 0, 0, 0, 1]


def test_adaptive_drafts_back_off():
    model = tiny_model("llama", seed=3)
    drop = random_drop(model, 8, scale=3.0)  # large random correctors: almost every draft is wrong
    prompt = random_prompt(6, seed=4)
    expected = list(generate(model, prompt, 100))
    fixed, adapted = LosslessStats(), LosslessStats()
    assert list(generate_lossless(model, prompt, 100, drop, stats=fixed)) == expected
    assert list(generate_lossless(model, prompt, 100, drop, stats=adapted, adaptive_drafts=True)) == expected
    assert fixed.acceptance_rate < 0.2, "the drafts are too good for this test"
    assert adapted.undrafted > adapted.cycles / 2
    assert adapted.drafted < fixed.drafted / 5


def test_period_one_has_no_drafts():
    model = tiny_model("gpt2")
    drop = random_drop(model, 1)
    prompt = random_prompt(4, seed=0)
    stats = LosslessStats()
    assert list(generate_lossless(model, prompt, 20, drop, stats=stats)) == list(generate(model, prompt, 20))
    assert stats.drafted == 0
    assert stats.cycles == 19


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_equals_plain_cache(family):
    model = tiny_model(family, seed=5)
    drop = random_drop(model, 4)
    prompt = random_prompt(7, seed=6)
    n_new = 30
    cache = model.new_cache(1, len(prompt) + n_new, drop=None)
    list(generate_lossless(model, prompt, n_new, drop, cache=cache))
    plain = model.new_cache(1, len(prompt) + n_new - 1)
    list(generate(model, prompt, n_new, cache=plain))

    n_positions = len(prompt) + n_new - 1
    assert cache.next_pos == n_positions
    for layer in range(model.config.n_layer):
        assert cache.lengths[layer] == n_positions, f"layer {layer}"
        assert cache.positions[layer] == list(range(n_positions)), f"layer {layer}"
        torch.testing.assert_close(cache.k[layer][:, :, :n_positions], plain.k[layer][:, :, :n_positions],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[layer][:, :, :n_positions], plain.v[layer][:, :, :n_positions],
                                   atol=1e-5, rtol=1e-5)


def test_stop_token_matches_plain():
    model = tiny_model("llama", seed=7)
    drop = random_drop(model, 5)
    prompt = random_prompt(5, seed=8)
    full = list(generate(model, prompt, 40))
    stop = full[12]
    expected = full[: full.index(stop) + 1]

    cache = model.new_cache(1, len(prompt) + 40, drop=None)
    assert list(generate_lossless(model, prompt, 40, drop, stop_ids=(stop,), cache=cache)) == expected
    assert cache.lengths == [len(prompt) + len(expected) - 1] * model.config.n_layer


@pytest.mark.parametrize("n_new", [1, 2, 3, 9])
def test_short_generation_matches_plain(n_new):
    model = tiny_model("gpt2", seed=9)
    drop = random_drop(model, 8)
    prompt = random_prompt(3, seed=10)
    cache = model.new_cache(1, len(prompt) + n_new, drop=None)
    assert list(generate_lossless(model, prompt, n_new, drop, cache=cache)) == list(generate(model, prompt, n_new))
    assert cache.lengths == [len(prompt) + n_new - 1] * model.config.n_layer


def test_embedded_model_greedy_equals_plain(smollm):
    model, tokenizer = smollm
    # Zero correctors with delta reuse on three layers: about half the drafts pass, so both paths run.
    drop = LoRADrop(model.config, Schedule.make(model.config.n_layer, "1,2,3", 4, "delta")).to(model.tok_emb.weight)
    stats = LosslessStats()
    for text in ["Write a Python function that adds two numbers.", "Name three colours of the rainbow."]:
        prompt = tokenizer.apply_chat_template(text)
        expected = list(generate(model, prompt, 32))
        assert list(generate_lossless(model, prompt, 32, drop, stats=stats)) == expected, text
    assert 0 < stats.accepted < stats.drafted


# -----------------------------------------------------------------------------
# Sampling: the acceptance rule


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.0, 3, None), (1.3, None, 0.8), (0.9, 20, 0.5)])
def test_sampling_probs_matches_sample_next(temperature, top_k, top_p):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 2
    g_reference, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    for _ in range(50):
        expected = sample_next(logits, temperature, top_k, top_p, g_reference)
        assert torch.equal(torch.multinomial(probs, 1, generator=g_ours), expected)


def test_accept_drafts_greedy():
    target = torch.full((4, VOCAB), -1.0)
    for row, token in enumerate([3, 5, 7, 2]):
        target[row, token] = 1.0
    assert accept_drafts([3, 5, 1], None, target, 0.0) == (2, 7)
    assert accept_drafts([3, 5, 7], None, target, 0.0) == (3, 2)
    assert accept_drafts([4, 5, 7], None, target, 0.0) == (0, 3)
    assert accept_drafts([], None, target[:1], 0.0) == (0, 3)


def test_accept_drafts_same_distribution_accepts():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=generator)
    q = sampling_probs(logits[:2], 1.0)
    for _ in range(200):
        drafts = torch.multinomial(q, 1, generator=generator)[:, 0].tolist()
        n_accepted, _ = accept_drafts(drafts, q, logits, 1.0, generator=generator)
        assert n_accepted == 2


def test_accept_drafts_rejects_token_full_model_excludes():
    # With top_k=1 the full model puts all probability on token 0, so a draft of 5 must be
    # rejected and replaced by 0, the only token where p exceeds q.
    generator = torch.Generator().manual_seed(0)
    target = torch.zeros(2, VOCAB)
    target[:, 0] = 5.0
    q = torch.full((1, VOCAB), 1.0 / VOCAB)
    for _ in range(100):
        assert accept_drafts([5], q, target, 1.0, top_k=1, generator=generator) == (0, 0)


def chi_square_bound(df, z=4.753):
    """Upper 1e-6 quantile of the chi-square distribution (Wilson-Hilferty approximation; z is the normal quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("adaptive_drafts", [False, True], ids=["fixed-drafts", "adaptive-drafts"])
def test_sampling_distribution_equals_full_model(adaptive_drafts):
    """The first three sampled tokens follow the full model's joint distribution.

    Vocabulary 8, so the joint distribution of three tokens has 512 cells and is computed
    exactly from the full model. Period 2 drafts one token per cycle, which exercises
    acceptance, the residual distribution and the bonus token. The check is Pearson's
    chi-square over N = 1000 draws: cells expecting at least 5 draws count alone, the rest are
    pooled into one cell, and the bound is the statistic's 1e-6 upper quantile (it grows with
    the degrees of freedom this model gives). With these seeds, always accepting scores about
    2080 against a bound of about 101, so a wrong acceptance rule fails.
    """
    vocab, n_draws = 8, 1000
    temperature, top_k = 0.9, 5
    model = tiny_model("llama", seed=2, vocab=vocab, n_layer=4, n_embd=16, n_head=2, max_seq_len=16, std=0.3)
    drop = random_drop(model, 2, seed=0, scale=0.5)
    prompt = [1, 5, 2]
    P = len(prompt)
    sequences = torch.tensor([prompt + list(t) for t in itertools.product(range(vocab), repeat=3)])  # (512, P + 3)

    def joint(logits):
        """Probability (512,) of each sequence's last three tokens under next-token logits (512, P + 3, vocab)."""
        total = torch.ones(len(sequences))
        for i in range(3):
            probs = sampling_probs(logits[:, P - 1 + i], temperature, top_k)
            total = total * probs.gather(1, sequences[:, P + i : P + i + 1])[:, 0]
        return total

    full_logits = model(sequences)
    exact = joint(full_logits)
    # Always accepting would take the second token from the draft (the LoRA step at decode step 1).
    always_accept_logits = full_logits.clone()
    always_accept_logits[:, P] = model.scheduled_forward(sequences, P, drop)[:, P]
    always_accept = joint(always_accept_logits)
    assert (always_accept - exact).abs().sum() / 2 > 0.5, "the draft is too close to the full model to test the rule"

    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab, vocab, vocab)
    stats = LosslessStats()
    for _ in range(n_draws):
        a, b, c = generate_lossless(model, prompt, 3, drop, temperature, top_k, generator=generator, stats=stats,
                                    adaptive_drafts=adaptive_drafts)
        counts[a, b, c] += 1

    observed, expected = counts.flatten(), exact * n_draws
    alone = expected >= 5
    chi_square = float(((observed - expected) ** 2 / expected)[alone].sum())
    pooled_expected = float(expected[~alone].sum())
    chi_square += (float(observed[~alone].sum()) - pooled_expected) ** 2 / pooled_expected
    bound = chi_square_bound(df=int(alone.sum()))
    assert chi_square <= bound, f"chi-square {chi_square:.1f} exceeds {bound:.1f}: the samples do not follow the full model"
    assert 0 < stats.accepted < stats.drafted


def test_sampling_reproducible_with_seed():
    model = tiny_model("gpt2", seed=11)
    drop = random_drop(model, 3)
    prompt = random_prompt(4, seed=12)
    runs = [list(generate_lossless(model, prompt, 25, drop, temperature=1.0, top_p=0.9,
                                   generator=torch.Generator().manual_seed(seed))) for seed in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(drop=None), "needs a LoRADrop"),
        (dict(short_cache=True), "allocate the cache with model.new_cache"),
        (dict(temperature=-1.0), "invalid temperature"),
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=[1, 500]), "token id 500 is outside the vocabulary"),
        (dict(prompt=[[1, 2], [3, 4]]), "give one prompt"),
        (dict(max_new_tokens=200), "longer than the model's context"),
        (dict(max_new_tokens=0), "invalid max_new_tokens"),
    ],
)
def test_bad_input_raises(change, message):
    model = tiny_model("llama")
    drop = random_drop(model, 4)
    prompt = change.get("prompt", [1, 2, 3])
    n_new = change.get("max_new_tokens", 10)
    cache = model.new_cache(1, 3 + 10, drop, prompt_len=3) if change.get("short_cache") else None
    with pytest.raises(ValueError, match=message):
        list(generate_lossless(model, prompt, n_new, change.get("drop", drop),
                               temperature=change.get("temperature", 0.0), cache=cache))


# -----------------------------------------------------------------------------
# Command line: generate.py --lossless and bench.py


class FakeTokenizer:
    """Characters in, one id per character out; enough of pretrained.Tokenizer for the scripts."""

    has_chat_template = False
    eos_ids = frozenset()

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text):
        return [ord(c) % self.vocab for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def stream_decoder(self):
        tokenizer = self

        class Pieces:
            def push(self, token_id):
                return tokenizer.decode([token_id])

            def flush(self):
                return ""

        return Pieces()


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """Make the scripts load a tiny random model and a character tokenizer, with no corrector checkpoint."""
    model = tiny_model("llama", seed=13)
    monkeypatch.setattr(pretrained, "load_model", lambda *args, **kwargs: (model, FakeTokenizer(VOCAB)))
    monkeypatch.setattr(gen, "DEFAULT_CKPT", str(tmp_path / "missing.safetensors"))
    return model


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_lossless_equals_plain(fake_model, capsys):
    base = ["--raw", "--prompt", "the quick brown fox", "--max-new-tokens", "16", "--device", "cpu", "--json"]
    gen.main(base + ["--no-drop"])
    plain = last_json(capsys)
    gen.main(base + ["--lossless", "--period", "3"])
    ours = last_json(capsys)
    assert ours["mode"] == "lossless"
    assert ours["text"] == plain["text"]
    assert ours["cycles"] > 0
    assert 0 <= ours["acceptance_rate"] <= 1
    assert ours["kv_bytes"] == ours["kv_bytes_all_positions"]


def test_cli_lossless_adaptive_drafts_equals_plain(fake_model, capsys):
    base = ["--raw", "--prompt", "a slow green turtle", "--max-new-tokens", "16", "--device", "cpu", "--json"]
    gen.main(base + ["--no-drop"])
    plain = last_json(capsys)
    gen.main(base + ["--lossless", "--adaptive-drafts", "--period", "4"])
    captured = capsys.readouterr()
    ours = json.loads(captured.out.strip().splitlines()[-1])
    assert ours["text"] == plain["text"]
    assert ours["cycles"] > 0
    assert "undrafted" in ours
    assert "0 to 3 (adaptive) LoRA drafts per cycle" in captured.err


def test_cli_adaptive_drafts_without_lossless_exits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen.parse_args(["--adaptive-drafts"])
    assert exit_info.value.code == 2
    assert "--adaptive-drafts sets the draft length of lossless mode; add --lossless" in capsys.readouterr().err


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["zero-correctors", "checkpoint"])
def test_cli_period_zero_rejected(fake_model, tmp_path, with_checkpoint):
    flags = ["--raw", "--prompt", "abc", "--max-new-tokens", "4", "--device", "cpu", "--period", "0"]
    if with_checkpoint:
        ckpt = tmp_path / "correctors.safetensors"
        lora_drop.save_correctors(str(ckpt), random_drop(fake_model, 4), fake_model)
        flags += ["--ckpt", str(ckpt)]
    with pytest.raises(ValueError, match="invalid refresh period 0: it must be an integer >= 1"):
        gen.main(flags)


def test_cli_schedule_override_notes_checkpoint(fake_model, tmp_path, capsys):
    ckpt = tmp_path / "correctors.safetensors"
    lora_drop.save_correctors(str(ckpt), random_drop(fake_model, 4), fake_model)
    base = ["--raw", "--prompt", "abc", "--max-new-tokens", "4", "--device", "cpu", "--ckpt", str(ckpt)]
    gen.main(base + ["--period", "4"])
    assert "note: the correctors were trained for" not in capsys.readouterr().err
    gen.main(base + ["--period", "2"])
    assert "note: the correctors were trained for period 4, reuse state" in capsys.readouterr().err


def test_cli_compare_lossless(fake_model, capsys):
    summary = gen.main(["--raw", "--prompt", "hello there", "--max-new-tokens", "12", "--device", "cpu",
                        "--compare", "--lossless", "--period", "4"])
    assert summary["agreement"] == 1.0
    assert summary["kv_reduction"] == 0.0
    assert "=== LoRA-Drop, lossless ===" in capsys.readouterr().out


def test_cli_lossless_with_no_drop_exits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen.parse_args(["--lossless", "--no-drop"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--lossless" in err
    assert "--no-drop" in err


def test_cli_lossless_with_adaptive_exits(capsys):
    with pytest.raises(SystemExit):
        gen.parse_args(["--lossless", "--refresh", "adaptive"])
    assert "exclude each other" in capsys.readouterr().err


def test_bench_times_extra_modes(fake_model, monkeypatch):
    monkeypatch.setattr(bench, "sum_bandwidth", lambda **kwargs: 1.0)
    res = bench.main(["--skip-hf", "--max-new-tokens", "10", "--repeats", "1", "--period", "3", "--device", "cpu"])
    assert res["lossless_stats"]["cycles"] > 0
    assert res["lossless_decode_tokens_per_s"] > 0
    assert res["kv_bytes_lossless"] == res["kv_bytes_plain"]
    assert res["adaptive_stats"]["decode_steps"] == 9
    assert res["adaptive_speedup"] > 0


def test_bench_rejects_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--extra-modes", "lossless,turbo"])
    assert "unknown mode 'turbo'" in capsys.readouterr().err


def test_prompt_suite_on_tiny_model():
    model = tiny_model("gpt2", seed=14)
    drop = random_drop(model, 3)
    lines = []
    summary = run_prompt_suite(model, FakeTokenizer(VOCAB), drop, max_new_tokens=6,
                               prompts=lossless.SUITE_PROMPTS[:3], log=lines.append)
    assert summary["prompts"] == 3
    assert summary["different_outputs"] == 0
    assert summary["ratio_total"] > 0
    assert summary["drafted"] > 0
    assert len(lines) == 5  # header, one line per prompt, summary
    adapted = run_prompt_suite(model, FakeTokenizer(VOCAB), drop, max_new_tokens=6,
                               prompts=lossless.SUITE_PROMPTS[:3], log=lines.append, adaptive_drafts=True)
    assert adapted["adaptive_drafts"]
    assert adapted["different_outputs"] == 0
    assert "adaptive draft length" in lines[-1]


def test_prompt_suite_has_twenty_varied_prompts():
    assert len(lossless.SUITE_PROMPTS) >= 20
    assert len(set(lossless.SUITE_PROMPTS)) == len(lossless.SUITE_PROMPTS)


def test_prompt_suite_empty_raises():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="prompt suite is empty"):
        run_prompt_suite(model, FakeTokenizer(VOCAB), random_drop(model, 3), prompts=())
