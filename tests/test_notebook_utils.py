"""Tests for notebook_utils.py, the notebooks' helpers, on a tiny random Llama model, on CPU, in seconds.

    python -m pytest tests/test_notebook_utils.py -q
"""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import notebook_utils as nu  # noqa: E402
from lora_drop import GPT, Config, LoRADrop, Schedule, save_correctors  # noqa: E402

N_LAYER = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GPT(Config(arch="llama", vocab_size=97, n_layer=N_LAYER, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=96))
    # Larger weights than the default init, so that every layer changes the residual stream visibly.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    return model.eval()


def make_drop(model, period=3, reuse="state", layers=None, random_correctors=True):
    drop = LoRADrop(model.config, Schedule.make(N_LAYER, layers, period, reuse), rank=4)
    if random_correctors:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for corrector in drop.correctors.values():
                corrector.B.weight.copy_(torch.randn(corrector.B.weight.shape, generator=generator) * 0.1)
    return drop.eval()


def tokens(batch=2, length=40, seed=2):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Run size, correctors and schedules


def test_notebook_size_default(monkeypatch):
    monkeypatch.delenv(nu.SIZE_ENV, raising=False)
    assert nu.notebook_size() == "full"


@pytest.mark.parametrize("value, expected", [("ci", "ci"), (" CI ", "ci"), ("full", "full"), ("", "full")])
def test_notebook_size_from_env(monkeypatch, value, expected):
    monkeypatch.setenv(nu.SIZE_ENV, value)
    assert nu.notebook_size() == expected


def test_notebook_size_invalid(monkeypatch):
    monkeypatch.setenv(nu.SIZE_ENV, "tiny")
    with pytest.raises(ValueError, match="LORA_DROP_NOTEBOOK_SIZE='tiny'"):
        nu.notebook_size()


def test_load_drop_without_checkpoint(model, tmp_path):
    drop, label = nu.load_drop(model, tmp_path / "missing.safetensors")
    assert label.startswith("zero correctors")
    assert drop.schedule == Schedule.make(N_LAYER)
    assert all(float(c.B.weight.detach().abs().max()) == 0 for c in drop.correctors.values())


def test_load_drop_with_checkpoint(model, tmp_path):
    trained = make_drop(model, period=4)
    path = tmp_path / "correctors.safetensors"
    save_correctors(str(path), trained, model)
    drop, label = nu.load_drop(model, path)
    assert label == "trained correctors from correctors.safetensors"
    assert drop.schedule == trained.schedule
    for name, corrector in trained.correctors.items():
        assert torch.equal(drop.correctors[name].B.weight, corrector.B.weight)


def test_with_schedule_keeps_shared_correctors(model):
    drop = make_drop(model, layers=[1, 2, 3])
    copy = nu.with_schedule(model, drop, layers=[2, 3, 4], period=5, reuse="delta")
    assert copy.schedule == Schedule((2, 3, 4), 5, "delta")
    assert torch.equal(copy.correctors["2"].B.weight, drop.correctors["2"].B.weight)
    assert float(copy.correctors["4"].B.weight.detach().abs().max()) == 0


def test_with_schedule_zero(model):
    copy = nu.with_schedule(model, make_drop(model), zero=True)
    assert all(float(c.B.weight.detach().abs().max()) == 0 for c in copy.correctors.values())


def test_with_schedule_rejects_bad_period(model):
    with pytest.raises(ValueError, match="refresh period"):
        nu.with_schedule(model, make_drop(model), period=0)


def test_schedule_grid_codes():
    schedule = Schedule.make(N_LAYER, period=3)  # droppable: 1, 2, 3, 5
    grid = nu.schedule_grid(schedule, N_LAYER, 7)
    assert grid.shape == (N_LAYER, 8)
    assert (grid[[0, 4]] == nu.KEPT).all()
    for i in schedule.layers:
        assert grid[i].tolist() == [nu.REFRESH, nu.LORA, nu.LORA, nu.REFRESH, nu.LORA, nu.LORA, nu.REFRESH, nu.LORA]


def test_plot_schedule_draws(model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    nu.plot_schedule(ax, Schedule.make(N_LAYER, period=3), N_LAYER, 7)
    assert ax.images[0].get_array().shape == (N_LAYER, 8)
    assert len(ax.get_legend().get_texts()) == 3
    plt.close(fig)


# -----------------------------------------------------------------------------
# Tracing one decode step


def prefilled(model, drop, prompt):
    cache = model.new_cache(1, 30, drop, prompt.size(1))
    model.prefill(prompt, cache, drop)
    return cache


@pytest.mark.parametrize("step", [1, 3])
def test_trace_matches_decode_step(model, step):
    drop = make_drop(model, period=3)
    prompt = tokens(1, 8)
    traced, plain = prefilled(model, drop, prompt), prefilled(model, drop, prompt)
    for j in range(1, step):
        token = torch.tensor([[j]])
        nu.trace_decode_step(model, token, traced, drop)
        model.decode_step(token, plain, drop)
    token = torch.tensor([[5]])
    logits, trace = nu.trace_decode_step(model, token, traced, drop)
    expected = model.decode_step(token, plain, drop)
    assert torch.equal(logits, expected)
    assert traced.lengths == plain.lengths
    refresh = drop.schedule.is_refresh(step)
    for row in trace:
        dropped = row["layer"] in drop.schedule.layers and not refresh
        assert row["mode"] == ("lora" if dropped else "full")
        assert row["kv_written"] == (not dropped)
        assert ("corrector_norm" in row) == dropped


def test_trace_records_lora_terms(model):
    drop = make_drop(model, period=3)
    cache = prefilled(model, drop, tokens(1, 8))
    _, trace = nu.trace_decode_step(model, torch.tensor([[5]]), cache, drop)
    for row in trace:
        if row["mode"] == "lora":
            assert row["corrector_norm"] > 0
            assert row["reuse_norm"] > 0
        assert math.isclose(row["output_norm"], float(row["output"].norm()), rel_tol=1e-6)
    for below, above in zip(trace, trace[1:]):
        assert math.isclose(below["output_norm"], above["input_norm"], rel_tol=1e-6)


def test_trace_without_drop(model):
    cache = model.new_cache(1, 20)
    model.prefill(tokens(1, 8), cache)
    _, trace = nu.trace_decode_step(model, torch.tensor([[5]]), cache)
    assert all(row["mode"] == "full" and row["kv_written"] for row in trace)


def test_trace_cleans_up_after_error(model):
    drop = make_drop(model)
    cache = model.new_cache(1, 20, drop, 8)  # not prefilled: decode_step raises
    with pytest.raises(RuntimeError, match="prefilled"):
        nu.trace_decode_step(model, torch.tensor([[5]]), cache, drop)
    assert "skip" not in vars(drop)
    assert all(not block._forward_hooks for block in model.blocks)


def test_relative_difference(model):
    drop = make_drop(model)
    cache = prefilled(model, drop, tokens(1, 8))
    _, trace = nu.trace_decode_step(model, torch.tensor([[5]]), cache, drop)
    assert (nu.relative_difference(trace, trace) == 0).all()


def test_kv_bytes_per_layer(model):
    drop = make_drop(model, period=3)
    cache = prefilled(model, drop, tokens(1, 8))
    for j in range(4):
        model.decode_step(torch.tensor([[j]]), cache, drop)
    per_layer = nu.kv_bytes_per_layer(cache)
    assert sum(per_layer) == cache.nbytes()
    assert per_layer[0] == 12 * cache.bytes_per_position()
    assert per_layer[1] == 9 * cache.bytes_per_position()  # prompt of 8 plus refresh step 3


# -----------------------------------------------------------------------------
# Hidden-state drift


def test_layer_states_chain(model):
    idx = tokens()
    inputs, outputs = nu.layer_states(model, idx)
    assert len(inputs) == len(outputs) == N_LAYER
    for i in range(1, N_LAYER):
        assert inputs[i] is outputs[i - 1]
    torch.testing.assert_close(model.head(outputs[-1]), model(idx))


def test_lagged_cosine_of_constant_states():
    states = [torch.ones(2, 10, 4), torch.ones(2, 10, 4) * 3]
    cosine = nu.lagged_cosine(states, 3)
    assert cosine.shape == (2, 3)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)


def test_lagged_cosine_skips_first_positions():
    h = torch.ones(1, 6, 2)
    h[0, 0] = torch.tensor([1.0, -1.0])  # position 0 points elsewhere
    assert nu.lagged_cosine([h], 1, first=1)[0, 0] == pytest.approx(1.0)
    assert nu.lagged_cosine([h], 1, first=0)[0, 0] < 1.0


def test_reuse_error_none_is_one(model):
    inputs, outputs = nu.layer_states(model, tokens())
    drop = make_drop(model, reuse="none", random_correctors=False)
    errors = nu.reuse_errors(inputs, outputs, drop, 4)
    assert errors.shape == (len(drop.schedule.layers), 4)
    np.testing.assert_allclose(errors, 1.0, rtol=1e-5)


@pytest.mark.parametrize("reuse", ["state", "delta"])
def test_reuse_error_by_hand(model, reuse):
    inputs, outputs = nu.layer_states(model, tokens())
    drop = make_drop(model, reuse=reuse)
    errors = nu.reuse_errors(inputs, outputs, drop, 3, first=1)
    layer, distance, start = drop.schedule.layers[1], 2, 1 + 3
    x, y = inputs[layer][:, start:], outputs[layer][:, start:]
    anchor_in, anchor_out = inputs[layer][:, start - distance : -distance], outputs[layer][:, start - distance : -distance]
    reuse_term = anchor_out if reuse == "state" else x + anchor_out - anchor_in
    predicted = reuse_term + drop.correctors[str(layer)](x)
    expected = ((predicted - y).norm(dim=-1) / (y - x).norm(dim=-1)).mean().item()
    assert errors[1, distance - 1] == pytest.approx(expected, rel=1e-5)


def test_reuse_error_sequence_too_short(model):
    inputs, outputs = nu.layer_states(model, tokens(1, 8))
    with pytest.raises(ValueError, match="too short"):
        nu.reuse_errors(inputs, outputs, make_drop(model), 8)


def test_residual_error_zero_at_period_one(model):
    errors = nu.residual_error_by_layer(model, tokens(), 10, make_drop(model, period=1))
    assert errors.shape == (N_LAYER,)
    np.testing.assert_allclose(errors, 0.0, atol=1e-5)


def test_residual_error_starts_at_first_droppable_layer(model):
    errors = nu.residual_error_by_layer(model, tokens(), 10, make_drop(model, period=4))
    assert errors[0] < 1e-5  # the default rule never drops layer 0
    assert errors[1] > 1e-2


def test_kl_by_phase(model):
    idx = tokens(length=30)
    kl = nu.kl_by_phase(model, idx, 10, make_drop(model, period=4))
    assert kl.shape == (4,)
    assert (kl > 0).all()
    np.testing.assert_allclose(nu.kl_by_phase(model, idx, 10, make_drop(model, period=1)), 0.0, atol=1e-5)


def test_kl_by_phase_missing_phase_is_nan(model):
    kl = nu.kl_by_phase(model, tokens(length=13), 10, make_drop(model, period=8))  # decode steps 1..3 only
    assert not math.isnan(kl[1])
    assert math.isnan(kl[0])


def test_stdlib_docstrings():
    text = nu.stdlib_docstrings(3000)
    assert len(text) == 3000
    assert text == nu.stdlib_docstrings(3000)


# -----------------------------------------------------------------------------
# Sweep results

CELL = {"period": 8, "share": 0.25, "speedup": 1.4, "ideal_speedup": 1.6, "ppl": 30.0, "full_ppl": 20.0, "top1": 0.5,
        "kl": 0.7, "kv_reduction": 0.2}


def write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_load_sweep_missing(tmp_path):
    rows, message = nu.load_sweep(tmp_path / "none.json")
    assert rows == []
    assert "no sweep results" in message
    assert "sweep.py" in message


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable JSON"),
    ('{"format": "x"}', "contains no cells"),
    ('"text"', "contains no cells"),
])
def test_load_sweep_unreadable(tmp_path, content, message):
    rows, text = nu.load_sweep(write(tmp_path / "sweep.json", content))
    assert rows == []
    assert message in text


def test_load_sweep_flat_list(tmp_path):
    rows, message = nu.load_sweep(write(tmp_path / "sweep.json", [CELL, {**CELL, "share": 50}]))
    assert message.startswith("2 sweep cells")
    assert rows[0]["ppl_ratio"] == pytest.approx(1.5)
    assert rows[1]["share"] == 0.5


def test_load_sweep_nested_cells(tmp_path):
    """The layout sweep.py writes: cells keyed by name, quality and speed figures nested."""
    quality = {k: CELL[k] for k in ("ppl", "full_ppl", "top1", "kl")} | {"ppl_ratio": 1.5, "tokens": 100}
    speed = {k: CELL[k] for k in ("speedup", "ideal_speedup", "kv_reduction")}
    cell = {"period": 8, "share": 0.25, "layers": [1, 2], "quality": quality, "speed": speed, "settings": {"a": 1}}
    rows, _ = nu.load_sweep(write(tmp_path / "sweep.json", {"format": "lora-drop-sweep/1", "cells": {"period=8,share=0.25": cell}}))
    assert len(rows) == 1
    assert rows[0]["speedup"] == 1.4
    assert rows[0]["kl"] == 0.7
    assert rows[0]["layers"] == [1, 2]


@pytest.mark.parametrize("bad", [{"kl": None}, {"kl": "0.7"}, {"kl": True}, {"kl": float("nan")}, {"speedup": None}])
def test_load_sweep_skips_incomplete_cells(tmp_path, bad):
    cell = {k: v for k, v in {**CELL, **bad}.items() if v is not None}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"cells": [CELL, cell]}), encoding="utf-8")
    rows, message = nu.load_sweep(path)
    assert len(rows) == 1
    assert "1 left out" in message


def test_sweep_path_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(nu.SWEEP_ENV, str(tmp_path / "other.json"))
    assert nu.sweep_path() == tmp_path / "other.json"
    monkeypatch.delenv(nu.SWEEP_ENV)
    assert nu.sweep_path() == nu.DEFAULT_SWEEP


@pytest.mark.skipif(not nu.DEFAULT_SWEEP.is_file(), reason="no committed results/sweep.json yet")
def test_committed_sweep_is_readable():
    rows, message = nu.load_sweep(nu.DEFAULT_SWEEP)
    assert rows, message
    assert "left out" not in message
