"""Tests for adaptive.py: refresh steps chosen by the top-1 probability signal, and teacher-forced evaluation.

    python -m pytest tests/test_adaptive.py -q
"""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adaptive  # noqa: E402
import bench  # noqa: E402
import generate as gen  # noqa: E402
import pretrained  # noqa: E402
from adaptive import (  # noqa: E402
    AdaptiveRefresh,
    AdaptiveStats,
    compare_with_fixed,
    evaluate_adaptive,
    evaluate_fixed,
    generate_adaptive,
    interpolate,
    teacher_forced_logits,
    with_period,
)
from lora_drop import generate  # noqa: E402
from test_lossless import FAMILIES, VOCAB, FakeTokenizer, random_drop, random_prompt, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "no_grad")


def random_sequences(batch_size, length, seed):
    return torch.randint(0, VOCAB, (batch_size, length), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# The two limits: threshold 1 is the plain model, threshold 0 the fixed period max_interval


@pytest.mark.parametrize("family", FAMILIES)
def test_always_firing_equals_plain(family):
    model = tiny_model(family)
    drop = random_drop(model, 4)
    policy = AdaptiveRefresh(threshold=1.0, max_interval=4)
    prompt = random_prompt(6, seed=1)
    stats = AdaptiveStats()
    assert list(generate_adaptive(model, prompt, 30, drop, policy, stats=stats)) == list(generate(model, prompt, 30))
    assert stats.refresh_steps == stats.decode_steps == 29

    tokens = random_sequences(1, 40, seed=2)
    logits, flags = teacher_forced_logits(model, drop, tokens, 8, policy)
    torch.testing.assert_close(logits[0], model(tokens)[0, 7:-1], atol=1e-4, rtol=0)
    assert all(flags)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_interval", [1, 3, 8])
def test_never_firing_equals_fixed_period(family, max_interval):
    model = tiny_model(family)
    drop = random_drop(model, 5)  # a period other than max_interval, which must not matter
    fixed = with_period(model, drop, max_interval)
    policy = AdaptiveRefresh(threshold=0.0, max_interval=max_interval)
    prompt = random_prompt(6, seed=3)
    stats = AdaptiveStats()
    got = list(generate_adaptive(model, prompt, 30, drop, policy, stats=stats))
    assert got == list(generate(model, prompt, 30, fixed))
    assert stats.refresh_steps == 29 // max_interval
    assert stats.signal_refreshes == 0

    tokens = random_sequences(1, 40, seed=4)
    logits, flags = teacher_forced_logits(model, drop, tokens, 8, policy)
    torch.testing.assert_close(logits[0], model.scheduled_forward(tokens, 8, fixed)[0, 7:-1], atol=1e-4, rtol=0)
    assert flags == [j % max_interval == 0 for j in range(1, len(flags) + 1)]


def test_sampling_with_always_firing_equals_plain_sampling():
    model = tiny_model("gpt2", seed=5)
    drop = random_drop(model, 4)
    prompt = random_prompt(4, seed=6)
    policy = AdaptiveRefresh(1.0, 4)
    got = list(generate_adaptive(model, prompt, 25, drop, policy, temperature=1.0, top_k=20,
                                 generator=torch.Generator().manual_seed(7)))
    expected = list(generate(model, prompt, 25, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7)))
    assert got == expected


# -----------------------------------------------------------------------------
# The rule between the limits


def test_signal_fires_at_threshold():
    assert AdaptiveRefresh(0.5, 8).signal_fires(torch.tensor([[0.0, 0.0]]))  # top-1 exactly 0.5
    assert not AdaptiveRefresh(0.5, 8).signal_fires(torch.tensor([[0.1, 0.0]]))
    # A top-1 probability that rounds to exactly 1.0 still fires at threshold 1, so it refreshes every step.
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert float(peaked.softmax(-1).max()) == 1.0
    assert AdaptiveRefresh(1.0, 8).signal_fires(peaked)
    # The top-1 probability is at least 1 / vocab, so threshold 0 never fires.
    assert not AdaptiveRefresh(0.0, 8).signal_fires(torch.zeros(1, 4))
    # One uncertain row is enough in a batch.
    assert AdaptiveRefresh(0.5, 8).signal_fires(torch.tensor([[5.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_refresh_follows_signal(family):
    """Each decision equals the rule applied to the previous output: top-1 <= threshold, or max_interval steps."""
    model = tiny_model(family, seed=8)
    drop = random_drop(model, 8)
    tokens = random_sequences(1, 60, seed=9)
    full_top1 = model(tokens)[0].softmax(-1).max(-1).values
    threshold = float(full_top1.median())  # fires on roughly half the steps
    policy = AdaptiveRefresh(threshold, max_interval=6)
    logits, flags = teacher_forced_logits(model, drop, tokens, 5, policy)

    since_refresh = 0
    for j, refresh in enumerate(flags):
        top1 = float(logits[0, j].softmax(-1).max())
        assert refresh == (top1 <= threshold or since_refresh + 1 >= 6), f"decode step {j + 1}"
        since_refresh = 0 if refresh else since_refresh + 1
    assert any(flags)
    assert not all(flags)
    # Steps the signal did not choose still refresh at max_interval: some refresh right after 5 LoRA steps.
    runs, run = [], 0
    for refresh in flags:
        runs, run = (runs + [run], 0) if refresh else (runs, run + 1)
    assert max(runs) <= 5


def test_cache_stores_refresh_positions_only():
    model = tiny_model("llama", seed=10)
    drop = random_drop(model, 8)
    prompt = random_prompt(5, seed=11)
    n_new = 30
    cache = model.new_cache(1, len(prompt) + n_new - 1, drop=None)
    stats = AdaptiveStats()
    list(generate_adaptive(model, prompt, n_new, drop, AdaptiveRefresh(0.05, 4), cache=cache, stats=stats))
    assert 0 < stats.refresh_steps < stats.decode_steps
    for layer in range(model.config.n_layer):
        expected = len(prompt) + (stats.refresh_steps if layer in drop.schedule.layers else stats.decode_steps)
        assert cache.lengths[layer] == expected, f"layer {layer}"
    assert cache.nbytes() < cache.full_nbytes()


def test_stop_token_ends_generation():
    model = tiny_model("gpt2", seed=12)
    drop = random_drop(model, 4)
    prompt = random_prompt(4, seed=13)
    policy = AdaptiveRefresh(0.05, 4)
    full = list(generate_adaptive(model, prompt, 30, drop, policy))
    stop = full[10]
    assert list(generate_adaptive(model, prompt, 30, drop, policy, stop_ids=(stop,))) == full[: full.index(stop) + 1]


# -----------------------------------------------------------------------------
# Teacher-forced evaluation


def test_evaluate_never_firing_equals_fixed():
    model = tiny_model("llama", seed=14)
    drop = random_drop(model, 8)
    tokens = random_sequences(2, 40, seed=15)
    adaptive_metrics = evaluate_adaptive(model, drop, tokens, 8, AdaptiveRefresh(0.0, 4))
    fixed_metrics = evaluate_fixed(model, drop, tokens, 8, 4)
    assert adaptive_metrics.keys() == fixed_metrics.keys()
    for key, value in fixed_metrics.items():
        assert adaptive_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert fixed_metrics["refresh_rate"] == pytest.approx((31 // 4) / 31)
    assert fixed_metrics["kl"] > 0
    assert fixed_metrics["top1_agreement"] < 1


def test_evaluate_always_firing_is_exact():
    model = tiny_model("gpt2", seed=16)
    drop = random_drop(model, 8)
    tokens = random_sequences(2, 30, seed=17)
    metrics = evaluate_adaptive(model, drop, tokens, 6, AdaptiveRefresh(1.0, 8))
    assert metrics["kl"] == pytest.approx(0, abs=1e-6)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["perplexity"] == pytest.approx(metrics["full_perplexity"], rel=1e-5)
    assert metrics["refresh_rate"] == 1.0
    assert metrics["decode_steps"] == 2 * (30 - 6 - 1)


def test_metrics_against_direct_computation():
    model = tiny_model("llama", seed=18)
    drop = random_drop(model, 3)
    tokens = random_sequences(1, 20, seed=19)
    metrics = evaluate_fixed(model, drop, tokens, 5, 3)
    logits = model.scheduled_forward(tokens, 5, with_period(model, drop, 3))[0, 5:-1]
    full = model(tokens)[0, 5:-1]
    targets = tokens[0, 6:]
    p_full = full.softmax(-1)
    kl = (p_full * (p_full.log() - logits.log_softmax(-1))).sum(-1).mean()
    assert metrics["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert metrics["top1_agreement"] == pytest.approx(float((logits.argmax(-1) == full.argmax(-1)).float().mean()))
    nll = -logits.log_softmax(-1).gather(1, targets[:, None]).mean()
    assert metrics["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_interpolate():
    points = [(1.0, 0.0), (0.5, 1.0), (0.25, 3.0)]
    assert interpolate(0.75, points) == pytest.approx(0.5)
    assert interpolate(0.25, points) == pytest.approx(3.0)
    assert interpolate(0.3, points) == pytest.approx(2.6)
    assert interpolate(0.1, points) is None


def test_compare_with_fixed_on_tiny_model():
    model = tiny_model("gpt2", seed=20)
    drop = random_drop(model, 4)
    tokens = random_sequences(2, 40, seed=21)
    lines = []
    result = compare_with_fixed(model, drop, tokens, 8, [0.0, 0.05, 1.0], 4, periods=range(1, 9), log=lines.append)
    assert list(result["fixed"]) == [str(k) for k in range(1, 9)]
    rows = result["adaptive"]
    assert [row["threshold"] for row in rows] == [0.0, 0.05, 1.0]
    # Threshold 0 is the fixed period max_interval, and threshold 1 the plain model.
    assert rows[0]["kl"] == pytest.approx(result["fixed"]["4"]["kl"], rel=1e-4)
    assert rows[0]["fixed_kl"] == pytest.approx(rows[0]["kl"], rel=1e-4)
    assert rows[2]["refresh_rate"] == 1.0
    assert rows[2]["kl"] == pytest.approx(0, abs=1e-6)
    assert len(lines) == 1 + 8 + 1 + 3 + 1


def test_heldout_sequences_shape():
    tokens = adaptive.heldout_sequences(FakeTokenizer(VOCAB), n_sequences=3, length=50, max_seq_len=128)
    assert tokens.shape == (3, 50)
    assert int(tokens.max()) < VOCAB
    assert adaptive.heldout_text(2000) == adaptive.heldout_text(2000)


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match=r"invalid refresh threshold .*\[0, 1\]"):
        AdaptiveRefresh(threshold, 8)


@pytest.mark.parametrize("max_interval", [0, -3, 2.5, True])
def test_bad_max_interval_raises(max_interval):
    with pytest.raises(ValueError, match="invalid max interval .* integer >= 1"):
        AdaptiveRefresh(0.5, max_interval)


def test_generate_without_drop_raises():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a LoRADrop"):
        list(generate_adaptive(model, [1, 2], 5, None, AdaptiveRefresh()))


def test_generate_with_bad_policy_raises():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="policy must be an AdaptiveRefresh"):
        list(generate_adaptive(model, [1, 2], 5, random_drop(model, 4), 0.5))


@pytest.mark.parametrize("prompt_len", [0, 19, 1.5])
def test_evaluate_bad_prompt_len_raises(prompt_len):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="invalid prompt_len"):
        evaluate_adaptive(model, random_drop(model, 4), random_sequences(1, 20, seed=0), prompt_len, AdaptiveRefresh())


def test_evaluate_bad_tokens_raise():
    model = tiny_model("llama")
    drop = random_drop(model, 4)
    with pytest.raises(ValueError, match="token id 500 is outside the vocabulary"):
        evaluate_adaptive(model, drop, [1, 2, 3, 500, 4], 2, AdaptiveRefresh())
    with pytest.raises(ValueError, match=r"tokens has shape \(1, 1, 5\)"):
        evaluate_fixed(model, drop, torch.zeros(1, 1, 5, dtype=torch.long), 2, 4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--refresh", "adaptive", "--threshold", "1.5"], "invalid --threshold 1.5"),
        (["--refresh", "adaptive", "--threshold", "-0.2"], "invalid --threshold -0.2"),
        (["--refresh", "adaptive", "--max-interval", "0"], "invalid --max-interval 0"),
        (["--threshold", "0.5"], "add --refresh adaptive"),
        (["--refresh", "adaptive", "--no-drop"], "cannot run with --no-drop"),
    ],
)
def test_cli_bad_adaptive_flags_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--threshold", "2"], "invalid --threshold 2.0"),
                                           (["--max-interval", "0"], "invalid --max-interval 0"),
                                           (["--eval-thresholds", "0.5,x"], "invalid --eval-thresholds")])
def test_bench_bad_adaptive_flags_exit(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Command line


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """Make the scripts load a tiny random model and a character tokenizer, with no corrector checkpoint."""
    model = tiny_model("llama", seed=22)
    monkeypatch.setattr(pretrained, "load_model", lambda *args, **kwargs: (model, FakeTokenizer(VOCAB)))
    monkeypatch.setattr(gen, "DEFAULT_CKPT", str(tmp_path / "missing.safetensors"))
    return model


def test_cli_adaptive_json(fake_model, capsys):
    base = ["--raw", "--prompt", "the quick brown fox", "--max-new-tokens", "16", "--device", "cpu", "--json"]
    gen.main(base + ["--no-drop"])
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    gen.main(base + ["--refresh", "adaptive", "--threshold", "1", "--max-interval", "4"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "adaptive"
    assert summary["text"] == plain["text"]
    assert summary["refresh_rate"] == 1.0
    assert summary["lora_step_share"] == 0.0


def test_bench_adaptive_eval(fake_model, capsys):
    res = bench.main(["--adaptive-eval", "--eval-sequences", "1", "--eval-length", "30", "--eval-prompt-len", "10",
                      "--eval-thresholds", "0,1", "--period", "4", "--device", "cpu"])
    assert [row["threshold"] for row in res["adaptive"]] == [0.0, 1.0]
    assert list(res["fixed"]) == [str(k) for k in range(1, 9)]
    assert "fixed period" in capsys.readouterr().err
