"""Tests for lora_drop.py on tiny random GPT-2 and Llama models, on CPU, in a few seconds.

    python -m pytest tests/test_lora_drop.py -q

Every model here is built from a fixed seed, so the tests need no downloads and no files
outside pytest's temporary folders.
"""

import dataclasses
import os
import sys

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, safe_open, save_file

# Let `pytest tests/test_lora_drop.py` import the model file from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_drop import (  # noqa: E402
    GPT,
    REUSE_RULES,
    Config,
    Corrector,
    LoRADrop,
    Schedule,
    generate,
    load_correctors,
    save_correctors,
    weights_fingerprint,
)

VOCAB = 97
N_LAYER = 6
MAX_LEN = 64
FAMILIES = {
    "gpt2": dict(arch="gpt2"),
    "llama": dict(arch="llama", n_kv_head=2),
    "llama-qkv-bias": dict(arch="llama", n_kv_head=2, qkv_bias=True),
}

pytestmark = pytest.mark.usefixtures("one_thread", "no_grad")


def make_model(family="llama", seed=0, n_layer=N_LAYER):
    """Build a width-64, 4-head model (6 layers by default) with random weights, in eval mode."""
    torch.manual_seed(seed)
    config = Config(vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_embd=64, max_seq_len=MAX_LEN, **FAMILIES[family])
    model = GPT(config)
    # With the default init (std 0.02) every layer is close to the identity, so a wrong
    # schedule would move the logits by little more than rounding error. Std 0.08 makes
    # each layer matter (logits of std about 0.6) while the cached and uncached paths
    # still agree to about 3e-6.
    for param in model.parameters():
        if param.dim() >= 2:
            param.normal_(0.0, 0.08)
        else:
            param.add_(torch.randn_like(param), alpha=0.1)
    return model.eval()


def make_drop(model, period=8, reuse="state", layers=None, rank=4, random_correctors=True, seed=1):
    """Build a LoRADrop for `model`. With random_correctors, every B matrix gets random non-zero weights.

    The same seed gives the same A and B matrices, so two drops differ only where their settings do.
    """
    torch.manual_seed(seed)
    drop = LoRADrop(model.config, Schedule.make(model.config.n_layer, layers, period, reuse), rank=rank)
    if random_correctors:
        generator = torch.Generator().manual_seed(seed)
        for corrector in drop.correctors.values():
            corrector.B.weight.copy_(torch.randn(corrector.B.weight.shape, generator=generator) * 0.1)
    return drop


def random_tokens(batch_size, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch_size, length), generator=generator)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def decode_logits(model, tokens, prompt_len, drop=None):
    """Prefill tokens[:, :prompt_len], then feed the rest one decode step at a time.

    Returns the logits for positions prompt_len - 1 .. T - 1, shape (B, T - prompt_len + 1, vocab),
    and the cache.
    """
    batch_size, length = tokens.shape
    cache = model.new_cache(batch_size, length, drop, prompt_len)
    logits = [model.prefill(tokens[:, :prompt_len], cache, drop)]
    for t in range(prompt_len, length):
        logits.append(model.decode_step(tokens[:, t : t + 1], cache, drop))
    return torch.stack(logits, dim=1), cache


# -----------------------------------------------------------------------------
# Cached decoding and the no-cache forward


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_cached_decode_matches_forward(family, prompt_len):
    model = make_model(family)
    tokens = random_tokens(2, 24)
    full = model(tokens)

    decoded, cache = decode_logits(model, tokens, prompt_len)

    assert decoded.shape == (2, 24 - prompt_len + 1, VOCAB)
    assert max_diff(decoded, full[:, prompt_len - 1 :]) <= 1e-5
    assert cache.next_pos == 24


# -----------------------------------------------------------------------------
# The exactness contract: scheduled forward == prefill + decode steps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reuse", REUSE_RULES)
@pytest.mark.parametrize("period", [1, 2, 3, 8])
def test_scheduled_forward_matches_decode(family, reuse, period):
    model = make_model(family)
    drop = make_drop(model, period, reuse)

    for prompt_len in (1, 5):
        # 2 * period decode steps end on a refresh step; one more ends on a LoRA step (when period > 1).
        for n_steps in (2 * period, 2 * period + 1):
            assert drop.schedule.is_refresh(n_steps) == (n_steps % period == 0)
            tokens = random_tokens(2, prompt_len + n_steps, seed=n_steps)

            scheduled = model.scheduled_forward(tokens, prompt_len, drop)
            decoded, _ = decode_logits(model, tokens, prompt_len, drop)

            assert scheduled.shape == (2, prompt_len + n_steps, VOCAB)
            assert max_diff(scheduled[:, prompt_len - 1 :], decoded) <= 1e-4, (prompt_len, n_steps)
            # Prefill runs every layer, so the prompt positions are those of the plain model.
            plain_prompt = model(tokens[:, :prompt_len])
            assert max_diff(scheduled[:, :prompt_len], plain_prompt) <= 1e-5, (prompt_len, n_steps)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_row_prompt_len(family):
    model = make_model(family)
    drop = make_drop(model, period=3, reuse="delta")
    tokens = random_tokens(2, 16)
    prompt_lens = torch.tensor([2, 7])

    batched = model.scheduled_forward(tokens, prompt_lens, drop)

    for row, prompt_len in enumerate(prompt_lens.tolist()):
        alone = model.scheduled_forward(tokens[row : row + 1], prompt_len, drop)
        decoded, _ = decode_logits(model, tokens[row : row + 1], prompt_len, drop)
        assert max_diff(batched[row : row + 1], alone) <= 1e-4, row
        assert max_diff(batched[row : row + 1, prompt_len - 1 :], decoded) <= 1e-4, row
    # Row 0 really used its own prompt length: with the other row's length it comes out different.
    row0_other_prompt = model.scheduled_forward(tokens[:1], 7, drop)
    assert max_diff(batched[:1], row0_other_prompt) > 1e-2


def test_scheduled_forward_rejects_empty_prompt():
    model = make_model("llama")
    drop = make_drop(model, period=2)
    with pytest.raises(ValueError, match=r"prompt_len must be >= 1, got \[0, 0\]"):
        model.scheduled_forward(random_tokens(2, 8), 0, drop)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_schedule_settings_change_logits(family):
    """Shows that the exactness grid can fail: each setting moves the logits far beyond 1e-4."""
    model = make_model(family)
    tokens = random_tokens(2, 20)
    prompt_len = 4
    plain = model(tokens)

    by_reuse = {reuse: model.scheduled_forward(tokens, prompt_len, make_drop(model, 3, reuse)) for reuse in REUSE_RULES}
    zero_correctors = model.scheduled_forward(tokens, prompt_len, make_drop(model, 3, random_correctors=False))
    period_4 = model.scheduled_forward(tokens, prompt_len, make_drop(model, 4))

    assert max_diff(by_reuse["state"][:, prompt_len:], plain[:, prompt_len:]) > 0.1
    assert max_diff(by_reuse["state"], by_reuse["delta"]) > 0.1
    assert max_diff(by_reuse["state"], by_reuse["none"]) > 0.1
    assert max_diff(by_reuse["state"], zero_correctors) > 0.1
    assert max_diff(by_reuse["state"], period_4) > 0.1


# -----------------------------------------------------------------------------
# Identities: k = 1, and reuse "none" against a model without the droppable layers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("reuse", REUSE_RULES)
def test_period_one_equals_plain_model(family, reuse):
    model = make_model(family)
    drop = make_drop(model, period=1, reuse=reuse)
    tokens = random_tokens(2, 18)

    # The scheduled forward runs droppable layers with an explicit causal mask in place of
    # is_causal, and the attention kernel may round the two differently: allow 1e-6.
    assert max_diff(model.scheduled_forward(tokens, 4, drop), model(tokens)) <= 1e-6

    # Decoding with k = 1 runs exactly the operations of plain decoding.
    with_drop, drop_cache = decode_logits(model, tokens, 4, drop)
    without_drop, plain_cache = decode_logits(model, tokens, 4)
    assert torch.equal(with_drop, without_drop)
    assert drop_cache.lengths == plain_cache.lengths


def kept_layer_model(model, drop):
    """Build a GPT with only the layers outside the droppable set, its weights copied from `model`."""
    kept_layers = [i for i in range(model.config.n_layer) if i not in drop.schedule.layers]
    small = GPT(dataclasses.replace(model.config, n_layer=len(kept_layers)))
    state = model.state_dict()
    small_state = {}
    for name in small.state_dict():
        if name.startswith("blocks."):
            _, j, rest = name.split(".", 2)
            small_state[name] = state[f"blocks.{kept_layers[int(j)]}.{rest}"]
        else:
            small_state[name] = state[name]
    small.load_state_dict(small_state)
    return small.eval(), kept_layers


def kept_layer_cache(small, cache, kept_layers):
    """Build a cache for `small` from copies of the kept layers' keys, values and positions."""
    small_cache = small.new_cache(cache.k[0].size(0), cache.k[kept_layers[0]].size(2))
    small_cache.k = [cache.k[i].clone() for i in kept_layers]
    small_cache.v = [cache.v[i].clone() for i in kept_layers]
    small_cache.lengths = [cache.lengths[i] for i in kept_layers]
    small_cache.positions = [list(cache.positions[i]) for i in kept_layers]
    small_cache.next_pos, small_cache.step = cache.next_pos, cache.step
    return small_cache


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reuse_none_equals_deleted_layers(family):
    # Prefill and refresh steps run every layer, so the kept layers' KV caches differ from
    # those of a model that never had the droppable layers, and a whole-sequence forward of
    # the smaller model gives other logits. The identity is per decode step: given the
    # kept layers' cache, a LoRA step equals one decode step of the smaller model.
    model = make_model(family)
    drop = make_drop(model, period=4, reuse="none", random_correctors=False)
    assert all(not c.B.weight.any() for c in drop.correctors.values())
    small, kept_layers = kept_layer_model(model, drop)
    prompt_len, n_steps = 3, 12
    tokens = random_tokens(2, prompt_len + n_steps)

    cache = model.new_cache(2, prompt_len + n_steps, drop, prompt_len)
    model.prefill(tokens[:, :prompt_len], cache, drop)
    small_logits, refresh_diffs = {}, []
    for n in range(1, n_steps + 1):
        token = tokens[:, prompt_len + n - 1 : prompt_len + n]
        expected = small.decode_step(token, kept_layer_cache(small, cache, kept_layers))
        logits = model.decode_step(token, cache, drop)
        if drop.schedule.is_refresh(n):
            refresh_diffs.append(max_diff(logits, expected))
        else:
            assert max_diff(logits, expected) <= 1e-6, n
            small_logits[prompt_len + n - 1] = expected

    assert len(refresh_diffs) == 3
    assert min(refresh_diffs) > 1e-3  # on refresh steps the droppable layers run, so it differs

    scheduled = model.scheduled_forward(tokens, prompt_len, drop)
    for position, expected in small_logits.items():
        assert max_diff(scheduled[:, position], expected) <= 1e-4, position


# -----------------------------------------------------------------------------
# KV cache: stored entries, positions, bytes and capacity


def expected_positions(layer, schedule, prompt_len, n_steps):
    """Return the positions a layer stores: the prompt, then every decode step, or only refresh steps when droppable."""
    steps = range(1, n_steps + 1)
    if layer in schedule.layers:
        steps = [j for j in steps if j % schedule.period == 0]
    return list(range(prompt_len)) + [prompt_len - 1 + j for j in steps]


@pytest.mark.parametrize("period", [1, 3, 8])
def test_kv_entries_match_schedule(period):
    model = make_model("llama")
    drop = make_drop(model, period)
    schedule, config = drop.schedule, model.config
    batch_size, prompt_len, max_steps = 2, 4, 13
    tokens = random_tokens(batch_size, prompt_len + max_steps)
    bytes_per_position = 2 * batch_size * config.n_kv_head * config.head_dim * 4  # keys + values, float32

    cache = model.new_cache(batch_size, prompt_len + max_steps, drop, prompt_len)
    model.prefill(tokens[:, :prompt_len], cache, drop)
    for n in range(max_steps + 1):
        if n > 0:
            model.decode_step(tokens[:, prompt_len + n - 1 : prompt_len + n], cache, drop)
        for i in range(config.n_layer):
            assert cache.lengths[i] == schedule.kv_entries(i, prompt_len, n), (i, n)
            assert cache.positions[i] == expected_positions(i, schedule, prompt_len, n), (i, n)
        assert cache.nbytes() == sum(cache.lengths) * bytes_per_position
        assert cache.full_nbytes() == config.n_layer * (prompt_len + n) * bytes_per_position

    # Counted by hand for 6 layers, droppable (1, 2, 3, 5), prompt 4, 13 steps: refresh steps are 13 // period.
    assert schedule.layers == (1, 2, 3, 5)
    assert cache.lengths == [17, 4 + 13 // period, 4 + 13 // period, 4 + 13 // period, 17, 4 + 13 // period]


def test_kv_bytes_bfloat16():
    model = make_model("gpt2").to(torch.bfloat16)
    config = model.config
    cache = model.new_cache(3, 10)
    model.prefill(random_tokens(3, 5), cache)
    assert cache.nbytes() == config.n_layer * 5 * 2 * 3 * config.n_kv_head * config.head_dim * 2
    assert cache.full_nbytes() == cache.nbytes()


def test_new_cache_capacity():
    model = make_model("llama")
    drop = make_drop(model, period=8)
    droppable = set(drop.schedule.layers)

    cache = model.new_cache(2, 20, drop, prompt_len=4)
    for i in range(N_LAYER):
        expected = 4 + 16 // 8 if i in droppable else 20
        assert cache.k[i].size(2) == expected, i
        assert cache.v[i].size(2) == expected, i

    # Without a prompt length (or without a schedule) every layer gets every position.
    assert [k.size(2) for k in model.new_cache(2, 20, drop).k] == [20] * N_LAYER
    assert [k.size(2) for k in model.new_cache(2, 20).k] == [20] * N_LAYER


def test_kv_cache_full_raises():
    model = make_model("llama")
    drop = make_drop(model, period=8)
    tokens = random_tokens(1, 12)
    cache = model.new_cache(1, 10, drop, prompt_len=4)
    model.prefill(tokens[:, :4], cache, drop)
    for t in range(4, 10):
        model.decode_step(tokens[:, t : t + 1], cache, drop)
    with pytest.raises(RuntimeError, match="KV cache for layer 0 is full"):
        model.decode_step(tokens[:, 10:11], cache, drop)


def test_decode_step_needs_prefill():
    model = make_model("llama")
    drop = make_drop(model, period=4)
    cache = model.new_cache(1, 10, drop, prompt_len=3)
    with pytest.raises(RuntimeError, match="prefill"):
        model.decode_step(torch.tensor([[1]]), cache, drop)


def test_forced_refresh_and_lora_step():
    model = make_model("llama")
    drop = make_drop(model, period=2)
    tokens = random_tokens(1, 8)
    cache = model.new_cache(1, 8)
    model.prefill(tokens[:, :4], cache, drop)

    model.decode_step(tokens[:, 4:5], cache, drop, refresh=True)  # step 1, a LoRA step by the schedule
    assert cache.lengths == [5] * N_LAYER
    model.decode_step(tokens[:, 5:6], cache, drop, refresh=False)  # step 2, a refresh step by the schedule
    assert cache.lengths == [6, 5, 5, 5, 6, 5]
    assert cache.positions[1] == [0, 1, 2, 3, 4]


def test_extend_matches_forward():
    model = make_model("gpt2")
    tokens = random_tokens(2, 20)
    cache = model.new_cache(2, 20)
    model.prefill(tokens[:, :5], cache)
    model.decode_step(tokens[:, 5:6], cache)

    extended = model.extend(tokens[:, 6:], cache)

    assert extended.shape == (2, 14, VOCAB)
    assert max_diff(extended, model(tokens)[:, 6:]) <= 1e-5
    assert cache.next_pos == 20


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_extend_matches_refresh_steps(family):
    # After LoRA steps a droppable layer stores fewer positions than the others. Extend must
    # let each new token attend to exactly the stored positions that a refresh step would see.
    model = make_model(family)
    drop = make_drop(model, period=3)
    tokens = random_tokens(2, 18)

    def decode_then(extend):
        cache = model.new_cache(2, 18)
        model.prefill(tokens[:, :4], cache, drop)
        for t in range(4, 9):
            model.decode_step(tokens[:, t : t + 1], cache, drop)
        if extend:
            return model.extend(tokens[:, 9:], cache, drop), cache
        steps = [model.decode_step(tokens[:, t : t + 1], cache, drop, refresh=True) for t in range(9, 18)]
        return torch.stack(steps, dim=1), cache

    extended, extend_cache = decode_then(extend=True)
    refreshed, refresh_cache = decode_then(extend=False)

    assert max_diff(extended, refreshed) <= 1e-4
    assert extend_cache.lengths == refresh_cache.lengths
    assert extend_cache.positions == refresh_cache.positions
    assert extend_cache.positions[1] == [0, 1, 2, 3, 6] + list(range(9, 18))


def test_truncate_resumes_plain_decoding():
    model = make_model("llama")
    tokens = random_tokens(1, 16)
    reference, _ = decode_logits(model, tokens, 4)
    cache = model.new_cache(1, 16)
    model.prefill(tokens[:, :4], cache)
    for t in range(4, 14):
        model.decode_step(tokens[:, t : t + 1], cache)

    cache.truncate(9)
    assert cache.lengths == [9] * N_LAYER
    assert cache.positions[0] == list(range(9))
    assert cache.next_pos == 9
    resumed = torch.stack([model.decode_step(tokens[:, t : t + 1], cache) for t in range(9, 16)], dim=1)
    assert max_diff(resumed, reference[:, 6:]) <= 1e-5


# -----------------------------------------------------------------------------
# Schedule parsing and validation


def test_default_droppable_thirty_layers():
    schedule = Schedule.make(30)
    kept_layers = set(range(0, 30, 4))
    assert len(schedule.layers) == 22
    assert not kept_layers & set(schedule.layers)
    assert set(schedule.layers) | kept_layers == set(range(30))
    assert (schedule.period, schedule.reuse) == (8, "state")


def test_explicit_layer_list():
    assert Schedule.make(30, "1,2,5").layers == (1, 2, 5)
    assert Schedule.make(30, [5, 1, 2]).layers == (1, 2, 5)
    assert Schedule.make(30, "").layers == ()


def test_stride_four_equals_default():
    assert Schedule.make(30, "stride:4").layers == Schedule.make(30).layers
    assert Schedule.make(30, "default").layers == Schedule.make(30).layers


def test_fraction_half():
    layers = Schedule.make(30, "fraction:0.5").layers
    assert len(layers) == 15
    assert 0 not in layers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(period=0), "refresh period 0"),
        (dict(period=-1), "refresh period -1"),
        (dict(layers="30"), "index 30 is out of range"),
        (dict(layers=[-1]), "index -1 is out of range"),
        (dict(layers="1,2,2"), "layer 2 is listed more than once"),
        (dict(layers=list(range(30))), "contains all 30 layers"),
        (dict(layers="fraction:0.99"), "contains all 30 layers"),
        (dict(reuse="skip"), "'skip'"),
        (dict(layers="stride:x"), "'stride:x'"),
        (dict(layers="stride:0"), "'stride:0'"),
        (dict(layers="fraction:1.5"), "'fraction:1.5'"),
        (dict(layers="1,,2"), "'1,,2'"),
    ],
)
def test_bad_schedule_raises(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        Schedule.make(30, **kwargs)
    assert message in str(excinfo.value)


def test_corrector_is_scaled_low_rank_map():
    corrector = Corrector(64, rank=4, alpha=16.0)
    x = torch.randn(2, 3, 64)
    assert not corrector(x).any()  # B starts at zero

    corrector.B.weight.normal_()
    expected = (x @ corrector.A.weight.T) @ corrector.B.weight.T * (16.0 / 4)
    assert max_diff(corrector(x), expected) <= 1e-5


@pytest.mark.parametrize("reuse", REUSE_RULES)
def test_skip_follows_reuse_rule(reuse):
    # Both decoding paths call skip(), so the exactness tests cannot see a wrong formula here.
    model = make_model("llama")
    drop = make_drop(model, period=4, reuse=reuse)
    layer = drop.schedule.layers[0]
    x = torch.randn(2, 5, 64)
    anchor_in, anchor_out = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    reuse_value = {"state": anchor_out, "delta": x + anchor_out - anchor_in, "none": x}[reuse]
    expected = reuse_value + drop.correctors[str(layer)](x)

    assert max_diff(drop.skip(layer, x, anchor_in, anchor_out), expected) <= 1e-6


@pytest.mark.parametrize("rank", [0, -2])
def test_bad_rank_raises(rank):
    config = make_model("llama").config
    with pytest.raises(ValueError, match=f"invalid corrector rank {rank}"):
        Corrector(config.n_embd, rank=rank)
    with pytest.raises(ValueError, match=f"invalid corrector rank {rank}"):
        LoRADrop(config, Schedule.make(config.n_layer), rank=rank)


# -----------------------------------------------------------------------------
# Generation


def greedy_by_hand(model, prompt, n_tokens):
    """Greedy decoding with the no-cache forward: rerun the whole sequence for each token."""
    ids = torch.tensor([prompt])
    for _ in range(n_tokens):
        next_id = model(ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generate_matches_forward(family):
    model = make_model(family)
    prompt = [5, 17, 3, 60]
    assert list(generate(model, prompt, 12)) == greedy_by_hand(model, prompt, 12)
    assert list(generate(model, torch.tensor([prompt]), 12)) == greedy_by_hand(model, prompt, 12)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generate_with_drop(family):
    # Greedy LoRA-Drop generation picks the argmax of the scheduled forward at every position.
    model = make_model(family)
    drop = make_drop(model, period=3)
    prompt = [5, 17, 3, 60]
    new = list(generate(model, prompt, 14, drop=drop))
    assert len(new) == 14

    tokens = torch.tensor([prompt + new])
    scheduled = model.scheduled_forward(tokens, len(prompt), drop)
    assert scheduled[0, len(prompt) - 1 : -1].argmax(dim=-1).tolist() == new


def test_generate_stop_ids():
    model = make_model("llama")
    prompt = [1, 2, 3]
    full = list(generate(model, prompt, 12))
    stop = full[4]
    first = full.index(stop)
    assert list(generate(model, prompt, 12, stop_ids={stop})) == full[: first + 1]


def test_generate_fills_given_cache():
    model = make_model("llama")
    drop = make_drop(model, period=3)
    cache = model.new_cache(1, 3 + 9, drop, prompt_len=3)
    new = list(generate(model, [1, 2, 3], 10, drop=drop, cache=cache))
    assert len(new) == 10
    assert cache.next_pos == 12  # the last generated token is never fed back
    assert cache.lengths[1] == 3 + 9 // 3


def test_sampling_reproducible_with_seed():
    model = make_model("llama")

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return list(generate(model, [1, 2, 3], 20, temperature=1.5, generator=generator))

    assert sample(123) == sample(123)
    assert sample(123) != sample(124)
    assert sample(123) != list(generate(model, [1, 2, 3], 20))


@pytest.mark.parametrize("option", [dict(top_k=1), dict(top_p=1e-6)])
def test_narrow_sampling_equals_greedy(option):
    model = make_model("gpt2")
    generator = torch.Generator().manual_seed(0)
    sampled = list(generate(model, [4, 8, 15], 15, temperature=1.0, generator=generator, **option))
    assert sampled == list(generate(model, [4, 8, 15], 15))


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ([1, 2], dict(max_new_tokens=0), "max_new_tokens 0"),
        ([1, 2], dict(max_new_tokens=-1), "max_new_tokens -1"),
        ([1, 2], dict(max_new_tokens=4, temperature=-0.5), "temperature -0.5"),
        ([1, 2], dict(max_new_tokens=4, top_p=0), "top_p 0"),
        ([1, 2], dict(max_new_tokens=4, top_p=1.5), "top_p 1.5"),
        ([1, 2], dict(max_new_tokens=4, top_k=0), "top_k 0"),
        ([], dict(max_new_tokens=4), "prompt is empty"),
        (list(range(60)), dict(max_new_tokens=10), "sequence of 70 tokens is longer than the model's context of 64"),
        ([[1, 2, 3], [4, 5, 6]], dict(max_new_tokens=4), "shape (2, 3)"),
        ([1, VOCAB], dict(max_new_tokens=4), f"token id {VOCAB} is outside"),
        ([-1, 2], dict(max_new_tokens=4), "token id -1 is outside"),
    ],
)
def test_generate_bad_input_raises(prompt, kwargs, message):
    model = make_model("llama")
    with pytest.raises(ValueError) as excinfo:
        next(generate(model, prompt, **kwargs))
    assert message in str(excinfo.value)


# -----------------------------------------------------------------------------
# Corrector checkpoints


def corrector_state(drop):
    return {name: tensor.clone() for name, tensor in drop.correctors.state_dict().items()}


def test_checkpoint_round_trip(tmp_path):
    model = make_model("llama")
    drop = LoRADrop(model.config, Schedule.make(N_LAYER, "1,2,5", period=3, reuse="delta"), rank=4, alpha=8.0)
    for corrector in drop.correctors.values():
        corrector.B.weight.normal_()
    path = tmp_path / "correctors.safetensors"

    save_correctors(path, drop, model, model_name="tiny-llama")
    loaded, meta = load_correctors(path, model)

    assert loaded.schedule == drop.schedule
    assert (loaded.rank, loaded.alpha) == (4, 8.0)
    assert meta["base_model"] == "tiny-llama"
    saved, restored = corrector_state(drop), corrector_state(loaded)
    assert saved.keys() == restored.keys()
    for name in saved:
        assert torch.equal(saved[name], restored[name]), name
    assert os.listdir(tmp_path) == ["correctors.safetensors"]


def test_checkpoint_loads_for_bfloat16_copy(tmp_path):
    model = make_model("gpt2")
    drop = make_drop(model, period=4)
    path = tmp_path / "correctors.safetensors"
    save_correctors(path, drop, model)

    loaded, _ = load_correctors(path, make_model("gpt2").to(torch.bfloat16))

    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_checkpoint_other_model_raises(tmp_path):
    path = tmp_path / "correctors.safetensors"
    model = make_model("llama", seed=0)
    save_correctors(path, make_drop(model), model, model_name="tiny")
    with pytest.raises(ValueError, match="another base model"):
        load_correctors(path, make_model("llama", seed=1))


@pytest.mark.parametrize("cut", ["4 bytes", "half", "all but 1 byte"])
def test_truncated_checkpoint_raises(tmp_path, cut):
    model = make_model("llama")
    path = tmp_path / "correctors.safetensors"
    save_correctors(path, make_drop(model), model)
    data = path.read_bytes()
    n_bytes = {"4 bytes": 4, "half": len(data) // 2, "all but 1 byte": len(data) - 1}[cut]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:n_bytes])

    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_correctors(truncated, model)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_correctors(tmp_path / "nothing.safetensors", make_model("llama"))


def rewrite_metadata(path, **changes):
    """Rewrite a checkpoint with the same tensors and edited metadata entries (None deletes one)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rank="8"), "do not match"),
        (dict(schedule='{"layers": [1, 2], "period": 8, "reuse": "state"}'), "do not match"),
        (dict(base_fingerprint=None), "base_fingerprint"),
        (dict(format=None), "not a lora-drop corrector checkpoint"),
    ],
)
def test_edited_checkpoint_raises(tmp_path, changes, message):
    model = make_model("llama")
    path = tmp_path / "correctors.safetensors"
    save_correctors(path, make_drop(model, rank=4), model)
    rewrite_metadata(path, **changes)

    with pytest.raises(ValueError, match=message):
        load_correctors(path, model)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = make_model("llama")
    path = tmp_path / "correctors.safetensors"
    save_correctors(path, make_drop(model, seed=1), model)
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("simulated full disk")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated full disk"):
        save_correctors(path, make_drop(model, seed=2), model)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["correctors.safetensors"]
    monkeypatch.undo()
    loaded, _ = load_correctors(path, model)
    assert torch.equal(corrector_state(loaded)["1.B.weight"], corrector_state(make_drop(model, seed=1))["1.B.weight"])


# -----------------------------------------------------------------------------
# Config and weights fingerprint


def test_config_unknown_arch_raises():
    with pytest.raises(ValueError, match="unknown arch 'mistral'"):
        Config(arch="mistral")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=65, n_head=4), "n_embd=65 must be divisible by n_head=4"),
        (dict(n_embd=64, n_head=4, n_kv_head=3), "n_kv_head=3"),
    ],
)
def test_config_bad_heads_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fingerprint_ignores_dtype(family):
    model = make_model(family)
    bf16 = make_model(family).to(torch.bfloat16)
    assert weights_fingerprint(model) == weights_fingerprint(bf16)


@pytest.mark.parametrize("name", ["norm.weight", "blocks.3.attn.qkv.weight"])
def test_fingerprint_changes_with_weight(name):
    model = make_model("llama")
    before = weights_fingerprint(model)
    # Element 0 of every tensor is in the hashed sample, and +0.5 survives rounding to bfloat16.
    model.get_parameter(name)[(0,) * model.get_parameter(name).dim()] += 0.5
    assert weights_fingerprint(model) != before
