"""Tests of train_correctors.py on tiny random models with a byte-level tokenizer: distillation,
checkpoints, resume, atomic saves, self-generated data and input checks."""

import json
import os
import re
import sys
import types

import pytest
import torch

import lora_drop
import train_correctors as tc
from lora_drop import GPT, Config, LoRADrop, Schedule

EOS, BOS, SEP = 256, 257, 258


class ByteTokenizer:
    """Bytes are token ids 0..255, and three special ids follow. The chat format is BOS, the first
    ten bytes of the prompt, SEP, so that every seed prompt fits a short training sequence."""

    eos_ids = frozenset({EOS})
    bos_id = BOS
    has_chat_template = True

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, user_prompt, system=None):
        return [BOS, *self.encode(user_prompt)[:10], SEP]


def tiny_model(seed=0):
    """A 4-layer Llama-style GPT whose weights are scaled up from the default initialisation, so that
    its next-token distributions are peaked and dropping a layer changes them noticeably."""
    torch.manual_seed(seed)
    model = GPT(Config(arch="llama", vocab_size=259, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


@pytest.fixture
def text_file(tmp_path, python_doc_paragraphs):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(python_doc_paragraphs[:60]), encoding="utf-8")
    return path


def make_args(tmp_path, data=None, *extra, out="correctors.safetensors"):
    argv = ["--out", str(tmp_path / out), "--seq-len", "32", "--period", "4", "--batch-size", "4",
            "--eval-every", "0", "--save-every", "0", "--eval-sequences", "8", "--cache-dir", str(tmp_path / "cache")]
    if data is not None:
        argv += ["--data", str(data)]
    return tc.parse_args(argv + [str(a) for a in extra])


def quiet(msg):
    pass


def optimizer_tensors(state_path):
    """The optimizer's per-parameter state tensors in a saved training state, keyed (param, name)."""
    state = torch.load(state_path, weights_only=True)
    return {(p, name): value for p, entry in state["optimizer"]["state"].items() for name, value in entry.items()}


# -----------------------------------------------------------------------------
# Distillation


def test_training_lowers_held_out_kl(tmp_path, text_file):
    summary = tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, text_file, "--steps", 150, "--lr", 1e-2), log=quiet)

    trained, zero, skip = (summary["eval"][k] for k in ("trained", "zero_correctors", "plain_skipping"))
    assert zero["kl"] > 0.05, "the tiny model should be hurt by dropping layers, or the test proves nothing"
    assert trained["kl"] < 0.8 * zero["kl"]
    assert trained["ppl"] < zero["ppl"]
    assert trained["full_ppl"] == zero["full_ppl"] == skip["full_ppl"]
    assert summary["history"][0]["step"] == 0
    assert summary["history"][-1]["step"] == 150


def test_training_changes_only_correctors(tmp_path, text_file):
    model = tiny_model()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    args = make_args(tmp_path, text_file, "--steps", 5)
    tc.train(model, ByteTokenizer(), args, log=quiet)

    for name, value in model.state_dict().items():
        assert torch.equal(value, base_before[name]), f"base tensor {name} changed"
    assert not any(p.requires_grad for p in model.parameters())
    drop, _ = lora_drop.load_correctors(args.out, model)
    assert any(c.B.weight.abs().sum() > 0 for c in drop.correctors.values()), "the correctors did not train"
    # The optimizer contains state for exactly the corrector matrices: A and B of each droppable layer.
    assert len(optimizer_tensors(tc.training_state_path(args.out))) == 3 * 2 * len(drop.correctors)


def test_loss_zero_at_period_one():
    model = tiny_model()
    drop = LoRADrop(model.config, Schedule.make(4, "1,2", period=1))
    inputs = torch.randint(0, 256, (2, 24))
    loss, kl, hidden = tc.distillation_loss(model, drop, inputs, torch.tensor([5, 9]), hidden_weight=1.0)
    assert abs(loss.item()) < 1e-5
    assert abs(hidden.item()) < 1e-8


def test_loss_gradients_reach_only_correctors():
    model = tiny_model().requires_grad_(False)
    drop = LoRADrop(model.config, Schedule.make(4, "1,2", period=4))
    with torch.no_grad():
        for c in drop.correctors.values():
            c.B.weight.normal_(std=0.1)  # with B = 0 the gradient of A is zero
    loss, kl, hidden = tc.distillation_loss(model, drop, torch.randint(0, 256, (2, 24)), torch.tensor([5, 9]), 0.5)
    loss.backward()
    assert kl > 0
    assert hidden > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in drop.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_hidden_weight_run_trains(tmp_path, text_file):
    summary = tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, text_file, "--steps", 10, "--hidden-weight", 1.0), log=quiet)
    assert summary["eval"]["trained"]["kl"] < summary["eval"]["zero_correctors"]["kl"]


# -----------------------------------------------------------------------------
# Evaluation


def test_evaluate_matches_full_model_at_period_one():
    model = tiny_model()
    batches = [torch.randint(0, 256, (3, 25)), torch.randint(0, 256, (2, 25))]
    result = tc.evaluate(model, LoRADrop(model.config, Schedule.make(4, "default", period=1)), batches, [6, 10])
    assert result["kl"] < 1e-5
    assert result["top1"] == 1.0
    assert result["ppl"] == pytest.approx(result["full_ppl"], rel=1e-5)
    assert result["tokens"] == (24 - 6) + (24 - 10) + (24 - 6) + (24 - 6) + (24 - 10)


def test_evaluate_scores_dropped_layers_worse():
    model = tiny_model()
    batches = [torch.randint(0, 256, (4, 25))]
    result = tc.evaluate(model, LoRADrop(model.config, Schedule.make(4, "1,2,3", period=4, reuse="none")), batches, 8)
    assert result["kl"] > 0.05
    assert result["top1"] < 1.0
    assert result["ppl"] != result["full_ppl"]


@pytest.mark.parametrize("prompt_len", [0, 24, [5, 30]])
def test_evaluate_rejects_bad_prompt_length(prompt_len):
    model = tiny_model()
    drop = LoRADrop(model.config, Schedule.make(4))
    with pytest.raises(ValueError, match=r"invalid prompt length \d+ for sequences of 24 tokens"):
        tc.evaluate(model, drop, [torch.randint(0, 256, (2, 25))], prompt_len)


def test_evaluation_prompt_lens_in_range():
    assert tc.evaluation_prompt_lens(128) == [32, 43, 53, 64]
    for seq_len in (9, 16, 32, 256):
        lens = tc.evaluation_prompt_lens(seq_len)
        assert all(1 <= n < seq_len for n in lens)


def test_training_prompt_lengths_cover_range():
    generator = torch.Generator().manual_seed(0)
    lens = tc.sample_prompt_lens(4000, 128, 8, generator)
    assert int(lens.min()) == 16
    assert int(lens.max()) == 120
    # The refresh cycle starts at every phase relative to the absolute position.
    assert set((lens % 8).tolist()) == set(range(8))


# -----------------------------------------------------------------------------
# Checkpoints and resume


def test_checkpoint_round_trip(tmp_path, text_file):
    model = tiny_model()
    args = make_args(tmp_path, text_file, "--steps", 6, "--rank", 4, "--alpha", 8, "--reuse", "delta", "--layers", "1,3")
    summary = tc.train(model, ByteTokenizer(), args, model_name="tiny", log=quiet)

    drop, meta = lora_drop.load_correctors(args.out, model)
    assert drop.schedule == Schedule((1, 3), 4, "delta")
    assert (drop.rank, drop.alpha, meta["base_model"]) == (4, 8.0, "tiny")
    saved = torch.load(tc.training_state_path(args.out), weights_only=True)
    assert saved["step"] == 6
    for name, value in drop.correctors.state_dict().items():
        assert torch.equal(value, saved["correctors"][name])

    held_out = tc.split_held_out(*tc.tokenize_file(args.data, ByteTokenizer(), 32))[1]
    batches = tc.evaluation_batches(held_out, 8, 4)
    result = tc.evaluate(model, drop, batches, tc.evaluation_prompt_lens(32))
    assert result["kl"] == pytest.approx(summary["eval"]["trained"]["kl"], rel=1e-5)


def interrupt_after(monkeypatch, n_steps):
    """Make the training loop raise KeyboardInterrupt when it starts step n_steps + 1, as Ctrl-C would."""
    real_loss = tc.distillation_loss
    calls = []

    def loss_then_interrupt(*a, **kw):
        if len(calls) == n_steps:
            raise KeyboardInterrupt
        calls.append(1)
        return real_loss(*a, **kw)

    monkeypatch.setattr(tc, "distillation_loss", loss_then_interrupt)


def test_resume_equals_uninterrupted_run(tmp_path, text_file, monkeypatch):
    whole = make_args(tmp_path, text_file, "--steps", 8, "--lr", 5e-3, out="whole.safetensors")
    tc.train(tiny_model(), ByteTokenizer(), whole, log=quiet)

    halves = make_args(tmp_path, text_file, "--steps", 8, "--lr", 5e-3, out="halves.safetensors")
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            tc.train(tiny_model(), ByteTokenizer(), halves, log=quiet)
    state_path = tc.training_state_path(halves.out)
    assert torch.load(state_path, weights_only=True)["step"] == 4
    saved_at_4 = optimizer_tensors(state_path)
    lora_drop.load_correctors(halves.out, tiny_model())  # Ctrl-C also wrote a loadable checkpoint

    restored = {}
    real_load_run = tc.load_run

    def load_run_and_record(args, drop, optimizer, generator, data_hash):
        result = real_load_run(args, drop, optimizer, generator, data_hash)
        restored.update({(p, k): v.clone() for p, e in optimizer.state_dict()["state"].items() for k, v in e.items()})
        return result

    monkeypatch.setattr(tc, "load_run", load_run_and_record)
    halves.resume = True
    summary = tc.train(tiny_model(), ByteTokenizer(), halves, log=quiet)
    assert (summary["steps"], summary["trained_steps"]) == (8, 4)

    assert restored.keys() == saved_at_4.keys()
    for key, value in saved_at_4.items():
        assert torch.equal(restored[key], value), f"optimizer state {key} was not restored"
    final_whole, final_halves = optimizer_tensors(tc.training_state_path(whole.out)), optimizer_tensors(state_path)
    for key, value in final_whole.items():
        torch.testing.assert_close(final_halves[key], value, rtol=1e-5, atol=1e-7, msg=f"optimizer state {key} differs")
    drop_whole, _ = lora_drop.load_correctors(whole.out, tiny_model())
    drop_halves, _ = lora_drop.load_correctors(halves.out, tiny_model())
    for (name, a), b in zip(drop_whole.state_dict().items(), drop_halves.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"corrector {name} differs")


def test_resume_without_state_fails(tmp_path, text_file):
    args = make_args(tmp_path, text_file, "--steps", 2, "--resume")
    with pytest.raises(FileNotFoundError, match="no training state to resume from at .*correctors.train-state.pt"):
        tc.train(tiny_model(), ByteTokenizer(), args, log=quiet)


def test_resume_with_other_rank_fails(tmp_path, text_file):
    tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, text_file, "--steps", 2), log=quiet)
    args = make_args(tmp_path, text_file, "--steps", 4, "--rank", 4, "--resume")
    with pytest.raises(ValueError, match=r"--rank 4 differs from the run being resumed \(8\)"):
        tc.train(tiny_model(), ByteTokenizer(), args, log=quiet)


def test_resume_with_other_data_fails(tmp_path, text_file):
    tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, text_file, "--steps", 2), log=quiet)
    text_file.write_text(text_file.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    with pytest.raises(ValueError, match="the training data differs"):
        tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, text_file, "--steps", 4, "--resume"), log=quiet)


def test_failed_checkpoint_write_keeps_previous(tmp_path, text_file, monkeypatch):
    import safetensors.torch

    args = make_args(tmp_path, text_file, "--steps", 3)
    tc.train(tiny_model(), ByteTokenizer(), args, log=quiet)
    before = open(args.out, "rb").read()
    state_before = open(tc.training_state_path(args.out), "rb").read()

    def write_half_then_fail(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    args.steps, args.resume = 5, True
    with pytest.raises(OSError, match="disk full"):
        tc.train(tiny_model(), ByteTokenizer(), args, log=quiet)
    assert open(args.out, "rb").read() == before
    assert open(tc.training_state_path(args.out), "rb").read() == state_before
    lora_drop.load_correctors(args.out, tiny_model())
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_failed_state_write_keeps_previous(tmp_path, text_file, monkeypatch):
    args = make_args(tmp_path, text_file, "--steps", 3)
    tc.train(tiny_model(), ByteTokenizer(), args, log=quiet)
    state_path = tc.training_state_path(args.out)
    before = open(state_path, "rb").read()

    def write_half_then_fail(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tc.save_atomically({"step": 9}, state_path)
    assert open(state_path, "rb").read() == before
    assert torch.load(state_path, weights_only=True)["step"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_interrupt_during_update_saves_nothing(tmp_path, text_file, monkeypatch):
    args = make_args(tmp_path, text_file, "--steps", 6)
    real_step = torch.optim.AdamW.step
    calls = []

    def step_then_interrupt(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    messages = []
    with pytest.raises(KeyboardInterrupt):
        tc.train(tiny_model(), ByteTokenizer(), args, log=messages.append)
    assert not os.path.exists(args.out)
    assert "interrupted during an optimizer update" in messages[-1]


def test_learning_rate_schedule():
    assert tc.learning_rate(0, 100, 1.0) == pytest.approx(0.1)
    assert tc.learning_rate(9, 100, 1.0) == pytest.approx(1.0)
    assert tc.learning_rate(10, 100, 1.0) == pytest.approx(1.0)
    assert tc.learning_rate(100, 100, 1.0) == pytest.approx(tc.MIN_LR_SHARE)
    rates = [tc.learning_rate(s, 100, 1.0) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


# -----------------------------------------------------------------------------
# Data


def test_self_generated_data_cached(tmp_path, monkeypatch):
    model = tiny_model()
    args = make_args(tmp_path, None, "--gen-prompts", 12, "--gen-rows", 3)
    windows, groups = tc.self_generated_data(model, ByteTokenizer(), args, quiet)

    assert windows.shape == (36, 33)
    assert groups.tolist() == [i for i in range(12) for _ in range(3)]
    for row, group in zip(windows, groups):
        prompt = ByteTokenizer().apply_chat_template(tc.SEED_PROMPTS[group])
        assert row[: len(prompt)].tolist() == prompt
        assert EOS not in row[len(prompt):].tolist()
    assert not torch.equal(windows[0], windows[1]), "rows of one prompt should be sampled differently"
    cached = [n for n in os.listdir(tmp_path / "cache") if n.startswith("selfgen-")]
    assert len(cached) == 1

    def no_sampling(*a, **kw):
        raise AssertionError("the cached data should have been used")

    monkeypatch.setattr(tc, "sample_rows", no_sampling)
    again, again_groups = tc.self_generated_data(model, ByteTokenizer(), args, quiet)
    assert torch.equal(again, windows)
    assert torch.equal(again_groups, groups)

    train, held_out = tc.split_held_out(windows, groups)
    assert (len(train), len(held_out)) == (33, 3)  # prompt 9 is held out


def test_self_generated_cache_depends_on_settings(tmp_path):
    model = tiny_model()
    tc.self_generated_data(model, ByteTokenizer(), make_args(tmp_path, None, "--gen-prompts", 2, "--gen-rows", 2), quiet)
    tc.self_generated_data(model, ByteTokenizer(), make_args(tmp_path, None, "--gen-prompts", 2, "--gen-rows", 2, "--top-p", 0.5), quiet)
    tc.self_generated_data(tiny_model(seed=1), ByteTokenizer(), make_args(tmp_path, None, "--gen-prompts", 2, "--gen-rows", 2), quiet)
    assert len(os.listdir(tmp_path / "cache")) == 3


def test_corrupt_cache_is_regenerated(tmp_path):
    model = tiny_model()
    args = make_args(tmp_path, None, "--gen-prompts", 2, "--gen-rows", 2)
    windows, _ = tc.self_generated_data(model, ByteTokenizer(), args, quiet)
    (path,) = (tmp_path / "cache").iterdir()
    path.write_bytes(b"not a torch file")
    messages = []
    again, _ = tc.self_generated_data(model, ByteTokenizer(), args, messages.append)
    assert any("cannot read the cached data" in m for m in messages)
    assert torch.equal(again, windows)


def test_self_generated_prompts_too_long(tmp_path):
    class LongPrompts(ByteTokenizer):
        def apply_chat_template(self, user_prompt, system=None):
            return [BOS, *self.encode(user_prompt), SEP]

    with pytest.raises(ValueError, match=r"only 0 of 4 seed prompts fit in half of a --seq-len 32 sequence"):
        tc.self_generated_data(tiny_model(), LongPrompts(), make_args(tmp_path, None, "--gen-prompts", 4), quiet)


def test_training_on_self_generated_data(tmp_path):
    summary = tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, None, "--gen-prompts", 12, "--gen-rows", 2, "--steps", 3), log=quiet)
    assert summary["data"] == {"train_sequences": 22, "held_out_sequences": 2, "eval_sequences": 2, "seq_len": 32}


def test_sample_rows_shape_and_prompt():
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    rows = tc.sample_rows(model, [BOS, 65, 66], 5, 7, 1.0, 0.9, [EOS], generator)
    assert rows.shape == (5, 10)
    assert (rows[:, :3] == torch.tensor([BOS, 65, 66])).all()


def test_jsonl_data_is_read_per_line(tmp_path, python_doc_paragraphs):
    path = tmp_path / "data.jsonl"
    texts = python_doc_paragraphs[:40]
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n", encoding="utf-8")
    assert tc.read_documents(path) == texts
    windows, groups = tc.tokenize_file(path, ByteTokenizer(), 32)
    assert windows.shape[1] == 33
    assert bytes(windows.reshape(-1).tolist()) == "\n\n".join(texts).encode()[: windows.numel()]


def test_json_array_line_is_plain_text(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("[1, 2, 3]\nsome text\n", encoding="utf-8")
    assert tc.read_documents(path) == ["[1, 2, 3]\nsome text\n"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"training data file .*data.txt is empty"),
        ("  \n\n\t\n", r"training data file .*data.txt is empty"),
        ("too short", r"data.txt has 9 tokens, fewer than the 66 needed .* --seq-len 32"),
        ('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n', r'data.txt line 3: no "text" field'),
        ('{"text": "a"}\n\n{"text": "b"\n', r"data.txt line 3: invalid JSON"),
        ('{"text": "a"}\n["text"]\n', r'data.txt line 2: no "text" field'),
        ('{"text": "a"}\n{"text": 5}\n', r'data.txt line 2: "text" is a int, not a string'),
    ],
)
def test_bad_data_file_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, path, "--steps", 1), log=quiet)


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"training data file not found: .*nowhere.txt; check --data"):
        tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, tmp_path / "nowhere.txt", "--steps", 1), log=quiet)


def test_non_utf8_data_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"caf\xe9 au lait " * 20)
    with pytest.raises(ValueError, match=r"data.txt is not UTF-8 text"):
        tc.read_documents(path)


def test_data_outside_vocabulary(tmp_path, text_file):
    class WideTokenizer(ByteTokenizer):
        def encode(self, text):
            return [b + 1000 for b in text.encode()]

    with pytest.raises(ValueError, match=r"id \d+, outside the model's vocabulary of 259"):
        tc.train(tiny_model(), WideTokenizer(), make_args(tmp_path, text_file, "--steps", 1), log=quiet)


def test_split_needs_two_groups():
    with pytest.raises(ValueError, match="single group"):
        tc.split_held_out(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long))


# -----------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq-len", "8"], r"--seq-len 8 must be larger than --period 8"),
        (["--steps", "0"], r"invalid --steps 0: it must be an integer >= 1"),
        (["--batch-size", "-2"], r"invalid --batch-size -2"),
        (["--lr", "0"], r"invalid --lr 0.0: it must be > 0"),
        (["--top-p", "1.5"], r"invalid --top-p 1.5"),
        (["--temperature", "0"], r"invalid --temperature 0.0"),
        (["--eval-every", "-1"], r"invalid --eval-every -1"),
        (["--hidden-weight", "-1"], r"invalid --hidden-weight -1.0"),
        (["--gen-prompts", "999"], r"invalid --gen-prompts 999: there are \d+ seed prompts"),
        (["--out", "x.pt"], r"invalid --out 'x.pt': the corrector checkpoint must be a .safetensors file"),
        (["--model", "tiny.gguf"], r"--model needs --out PATH"),
        (["--reuse", "copy"], r"invalid choice: 'copy'"),
    ],
)
def test_bad_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tc.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_every_option_has_help_text():
    for action in tc.build_parser()._actions:
        assert action.help, f"option {action.option_strings} has no help text"


def test_bad_layer_rule_is_rejected(tmp_path, text_file):
    with pytest.raises(ValueError, match="invalid droppable-layer rule 'every:2'"):
        tc.train(tiny_model(), ByteTokenizer(), make_args(tmp_path, text_file, "--layers", "every:2"), log=quiet)


def test_seq_len_longer_than_context(tmp_path, text_file):
    args = make_args(tmp_path, text_file)
    args.seq_len = 100
    with pytest.raises(ValueError, match=r"--seq-len 100 is longer than the model's context of 64 tokens"):
        tc.train(tiny_model(), ByteTokenizer(), args, log=quiet)


def test_main_loads_model_and_prints_json(tmp_path, text_file, monkeypatch, capsys):
    calls = []

    def load_model(spec=None, device="cpu", dtype=torch.float32, cache_dir=None):
        calls.append((spec, str(device), dtype, cache_dir))
        return tiny_model(), ByteTokenizer()

    fake = types.SimpleNamespace(load_model=load_model, DEFAULT_GGUF_NAME="tiny.gguf")
    monkeypatch.setitem(sys.modules, "pretrained", fake)
    out = tmp_path / "main.safetensors"
    summary = tc.main(["--model", "tiny-spec", "--out", str(out), "--data", str(text_file), "--seq-len", "32",
                       "--period", "4", "--steps", "2", "--device", "cpu", "--cache-dir", str(tmp_path), "--json"])

    assert calls == [("tiny-spec", "cpu", torch.float32, str(tmp_path))]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == summary["steps"] == 2
    assert set(printed["eval"]) == {"trained", "zero_correctors", "plain_skipping"}
    _, meta = lora_drop.load_correctors(str(out), tiny_model())
    assert meta["base_model"] == "tiny-spec"


def test_main_rejects_unknown_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "pretrained", types.SimpleNamespace())
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        tc.main(["--device", "gpu0"])
