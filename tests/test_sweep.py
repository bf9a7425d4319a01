"""Tests of sweep.py and bench.py --quality on a tiny random model with a byte-level tokenizer:
the quality table, the resumable sweep and its results file, the safe-zone verdict and input checks."""

import json
import os
import re

import pytest
import torch

import bench
import generate as gen
import lora_drop
import pretrained
import sweep
import train_correctors as tc
from lora_drop import LoRADrop, Schedule
from test_train import ByteTokenizer, tiny_model  # the same byte tokenizer and tiny model as the training tests


def random_drop(model, layers="1,2", period=4, seed=1):
    """A LoRADrop whose correctors have random, non-zero B matrices, standing in for trained ones."""
    torch.manual_seed(seed)
    drop = LoRADrop(model.config, Schedule.make(model.config.n_layer, layers, period))
    with torch.no_grad():
        for corrector in drop.correctors.values():
            corrector.B.weight.normal_(std=0.05)
    return drop


def quiet(msg=""):
    pass


# Small training, evaluation and timing settings, so that a cell takes well under a second.
TRAIN_ARGS = "--seq-len 32 --batch-size 2 --gen-prompts 12 --gen-rows 2"


def sweep_options(tmp_path, *extra):
    argv = ["--out", str(tmp_path / "results" / "sweep.json"), "--periods", "2,4", "--shares", "0.5", "--steps", "2",
            "--train-args", TRAIN_ARGS, "--cache-dir", str(tmp_path / "cache"), "--eval-sequences", "2",
            "--eval-length", "32", "--speed-tokens", "4", "--speed-repeats", "1"]
    return sweep.parse_args(argv + [str(a) for a in extra])


def count_training(monkeypatch, fail_on_call=None):
    """Wrap train_correctors.train: record each call's resume flag, and raise KeyboardInterrupt on call fail_on_call."""
    real_train = tc.train
    calls = []

    def train(model, tokenizer, args, **kwargs):
        calls.append(args.resume)
        if len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return real_train(model, tokenizer, args, **kwargs)

    monkeypatch.setattr(tc, "train", train)
    return calls


# -----------------------------------------------------------------------------
# Held-out text and the quality table


def test_quality_table_rows():
    model = tiny_model()
    drop = random_drop(model)
    held_out = sweep.load_held_out(ByteTokenizer(), 259, None, n_sequences=4, length=32)
    rows = sweep.quality_table(model, sweep.quality_drops(model, drop.schedule, drop), held_out)

    assert list(rows) == ["full_model", "plain_skipping", "zero_correctors", "trained"]
    full = rows["full_model"]
    assert abs(full["kl"]) < 1e-6
    assert full["top1"] == 1.0
    assert full["ppl"] == pytest.approx(full["full_ppl"], rel=1e-6)
    assert rows["plain_skipping"]["kl"] > 0.05, "dropping two of four layers should change the tiny model's output"
    assert rows["plain_skipping"]["top1"] < 1.0
    assert rows["zero_correctors"]["kl"] != pytest.approx(rows["plain_skipping"]["kl"])
    assert rows["trained"]["kl"] != pytest.approx(rows["zero_correctors"]["kl"])
    assert len({row["tokens"] for row in rows.values()}) == 1
    assert len({row["full_ppl"] for row in rows.values()}) == 1
    # Four windows with prompt lengths 8, 11, 13 and 16 of 32 tokens: every later position is scored.
    assert full["tokens"] == (32 - 8) + (32 - 11) + (32 - 13) + (32 - 16)


def test_quality_rows_match_evaluate():
    model = tiny_model()
    drop = random_drop(model)
    held_out = sweep.load_held_out(ByteTokenizer(), 259, None, n_sequences=4, length=32, prompt_len=10)
    rows = sweep.quality_table(model, sweep.quality_drops(model, drop.schedule, drop), held_out)
    alone = tc.evaluate(model, drop, held_out.batches(), [10])
    assert rows["trained"]["kl"] == pytest.approx(alone["kl"], rel=1e-6)
    assert rows["trained"]["ppl"] == pytest.approx(alone["ppl"], rel=1e-6)


def test_run_quality_prints_markdown():
    model = tiny_model()
    drop = random_drop(model)
    messages = []
    result = sweep.run_quality(model, ByteTokenizer(), drop.schedule, None, "zero correctors", None, 2, 32, log=messages.append)

    assert list(result["rows"]) == ["full_model", "plain_skipping", "zero_correctors"]
    assert result["eval"] == {"data": "pydoc_data.topics", "sequences": 2, "length": 32, "prompt_lens": [8, 11, 13, 16],
                              "tokens": (32 - 8) + (32 - 11)}
    text = "\n".join(messages)
    assert "| decoding | perplexity | top-1 agreement | KL (nats/token) |" in text
    assert re.search(r"\| full model \| [\d.]+ \| 100\.0% \| 0\.0000 \|", text)
    assert "| zero correctors (reuse state) |" in text
    assert "no trained-correctors row" in text


def test_windows_evenly_spaced_from_jsonl(tmp_path):
    texts = [f"document {i}: " + "abcdefghij" * 10 for i in range(20)]
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")
    held_out = sweep.load_held_out(ByteTokenizer(), 259, path, n_sequences=3, length=63)

    ids = ByteTokenizer().encode("\n\n".join(texts))
    available = len(ids) // 64
    assert held_out.windows.shape == (3, 64)
    for row, start in zip(held_out.windows, [0, available // 3, 2 * available // 3]):
        assert row.tolist() == ids[64 * start: 64 * start + 64]
    assert held_out.source == str(path)


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, FileNotFoundError, r"text file not found: .*nowhere.txt; check --data"),
        ("", ValueError, r"text file .*text.txt is empty"),
        (" \n\t\n", ValueError, r"text file .*text.txt is empty"),
        ("too short", ValueError, r"text.txt has 9 tokens, fewer than the 66 needed for --eval-sequences 2 windows "
                                  r"of --eval-length 32"),
        ('{"text": "a"}\n{"body": "b"}\n', ValueError, r'text.txt line 2: no "text" field'),
    ],
)
def test_bad_data_file_errors(tmp_path, content, error, message):
    path = tmp_path / ("nowhere.txt" if content is None else "text.txt")
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=message):
        sweep.load_held_out(ByteTokenizer(), 259, path, n_sequences=2, length=32)


def test_text_outside_vocabulary():
    class WideTokenizer(ByteTokenizer):
        def encode(self, text):
            return [b + 1000 for b in text.encode()]

    with pytest.raises(ValueError, match=r"id \d+, outside the model's vocabulary of 259"):
        sweep.load_held_out(WideTokenizer(), 259, None, n_sequences=4, length=32)


def test_eval_longer_than_context():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"--eval-length 100 is longer than the model's context of 64 tokens"):
        sweep.run_quality(model, ByteTokenizer(), Schedule.make(4), n_sequences=2, length=100, log=quiet)


# -----------------------------------------------------------------------------
# bench.py --quality


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """Make bench.py load the tiny model and the byte tokenizer, with no shipped corrector checkpoint."""
    model = tiny_model()
    monkeypatch.setattr(pretrained, "load_model", lambda *args, **kwargs: (model, ByteTokenizer()))
    monkeypatch.setattr(gen, "DEFAULT_CKPT", str(tmp_path / "missing.safetensors"))
    return model


def test_bench_quality_with_checkpoint(fake_model, tmp_path, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    lora_drop.save_correctors(str(ckpt), random_drop(fake_model), fake_model)
    res = bench.main(["--quality", "--ckpt", str(ckpt), "--eval-sequences", "2", "--eval-length", "32", "--json"])

    assert list(res["rows"]) == ["full_model", "plain_skipping", "zero_correctors", "trained"]
    assert res["schedule"]["layers"] == [1, 2]
    assert res["schedule"]["period"] == 4
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["rows"]["full_model"]["top1"] == 1.0
    assert "| trained correctors |" in captured.err


def test_bench_quality_without_checkpoint(fake_model, capsys):
    res = bench.main(["--quality", "--eval-sequences", "2", "--eval-length", "32", "--eval-prompt-len", "20"])
    assert "trained" not in res["rows"]
    assert res["eval"]["prompt_lens"] == [20]
    assert res["rows"]["full_model"]["tokens"] == 2 * (32 - 20)
    assert "no trained-correctors row" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quality", "--adaptive-eval"], "--quality excludes --adaptive-eval and --lossless-suite"),
        (["--data", "text.txt"], "--data applies only to --quality"),
        (["--quality", "--eval-prompt-len", "300"], "invalid --eval-prompt-len 300: it must be from 1 to --eval-length - 1 (255)"),
        (["--quality", "--eval-sequences", "0"], "invalid --eval-sequences 0"),
        (["--quality", "--data", "/nonexistent/text.txt"], "text file not found: /nonexistent/text.txt; check --data"),
        (["--adaptive-eval", "--eval-prompt-len", "127"], "--eval-prompt-len from 1 to --eval-length - 2 (got 127 and 128)"),
    ],
)
def test_bench_bad_quality_flags_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The sweep: results file, skipping and resuming


def test_sweep_writes_and_skips(tmp_path, monkeypatch):
    options = sweep_options(tmp_path)
    calls = count_training(monkeypatch)
    results = sweep.run_sweep(tiny_model(), ByteTokenizer(), options, log=quiet)

    assert calls == [False, False]
    saved = json.loads((tmp_path / "results" / "sweep.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(results))
    assert list(saved["cells"]) == ["period=2,share=0.5", "period=4,share=0.5"]
    for period, cell in zip((2, 4), saved["cells"].values()):
        assert (cell["period"], cell["share"], cell["layers"]) == (period, 0.5, [1, 3])
        assert cell["settings"]["train"]["steps"] == 2
        assert cell["settings"]["train"]["layers"] == "fraction:0.5"
        assert cell["train"]["trained_steps"] == 2
        assert cell["quality"]["ppl_ratio"] == pytest.approx(cell["quality"]["ppl"] / cell["quality"]["full_ppl"])
        assert cell["speed"]["speedup"] > 0
        assert 1 < cell["speed"]["ideal_speedup"] < 2
        assert cell["speed"]["kv_reduction"] > 0
        checkpoint = tmp_path / "results" / cell["checkpoint"]
        assert checkpoint == tmp_path / "results" / "sweep" / f"period{period}-share0.5.safetensors"
        drop, _ = lora_drop.load_correctors(str(checkpoint), tiny_model())
        assert drop.schedule.period == period

    calls.clear()
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path), log=quiet)
    assert calls == [], "finished cells with unchanged settings must not train again"
    assert json.loads((tmp_path / "results" / "sweep.json").read_text(encoding="utf-8")) == saved


def test_changed_steps_reruns_cells(tmp_path, monkeypatch):
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path), log=quiet)
    calls = count_training(monkeypatch)
    messages = []
    results = sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path, "--steps", 3), log=messages.append)

    assert calls == [False, False], "a new step count trains each cell from the start"
    assert any("settings changed since it ran (train.steps)" in m for m in messages)
    assert [cell["train"]["trained_steps"] for cell in results["cells"].values()] == [3, 3]


def test_changed_eval_reuses_correctors(tmp_path, monkeypatch):
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path), log=quiet)
    calls = count_training(monkeypatch)
    messages = []
    options = sweep_options(tmp_path, "--eval-prompt-len", "12")
    results = sweep.run_sweep(tiny_model(), ByteTokenizer(), options, log=messages.append)

    assert calls == [True, True], "the saved training runs are complete, so they are continued, not restarted"
    assert [cell["train"]["trained_steps"] for cell in results["cells"].values()] == [0, 0]
    assert any("eval.prompt_lens" in m for m in messages)
    assert all(cell["settings"]["eval"]["prompt_lens"] == [12] for cell in results["cells"].values())


def test_changed_data_reruns_cells(tmp_path, monkeypatch, python_doc_paragraphs):
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path), log=quiet)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(python_doc_paragraphs[:40]), encoding="utf-8")
    calls = count_training(monkeypatch)
    messages = []
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path, "--data", text), log=messages.append)
    assert len(calls) == 2
    assert any("eval.data, eval.fingerprint" in m for m in messages)


def test_changed_training_text_reruns_cells(tmp_path, monkeypatch, python_doc_paragraphs):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(python_doc_paragraphs[:40]), encoding="utf-8")
    train_args = f"--seq-len 32 --batch-size 2 --data {corpus}"
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path, "--train-args", train_args), log=quiet)
    corpus.write_text("\n\n".join(python_doc_paragraphs[40:80]), encoding="utf-8")
    calls = count_training(monkeypatch)
    messages = []
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path, "--train-args", train_args), log=messages.append)

    assert calls == [False, False], "new training text must train each cell from the start"
    assert any("settings changed since it ran (train_data)" in m for m in messages)


def test_force_reruns_cells(tmp_path, monkeypatch):
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path), log=quiet)
    calls = count_training(monkeypatch)
    sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path, "--force"), log=quiet)
    assert calls == [False, False]


def test_interrupted_sweep_resumes(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        count_training(m, fail_on_call=2)
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path), log=quiet)
    saved = json.loads((tmp_path / "results" / "sweep.json").read_text(encoding="utf-8"))
    assert list(saved["cells"]) == ["period=2,share=0.5"]

    calls = count_training(monkeypatch)
    results = sweep.run_sweep(tiny_model(), ByteTokenizer(), sweep_options(tmp_path), log=quiet)
    assert calls == [False]
    assert list(results["cells"]) == ["period=2,share=0.5", "period=4,share=0.5"]
    assert results["cells"]["period=2,share=0.5"] == saved["cells"]["period=2,share=0.5"]


def test_failed_write_keeps_previous_results(tmp_path, monkeypatch):
    path = tmp_path / "sweep.json"
    sweep.save_results(str(path), {"format": sweep.RESULTS_FORMAT, "cells": {"a": 1}})
    before = path.read_bytes()

    def write_half_then_fail(obj, f, **kwargs):
        f.write('{"format": "lora-drop-sw')
        raise OSError("disk full")

    monkeypatch.setattr(sweep.json, "dump", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        sweep.save_results(str(path), {"format": sweep.RESULTS_FORMAT, "cells": {"a": 1, "b": 2}})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["sweep.json"]


@pytest.mark.parametrize(
    "content, message",
    [("{not json", r"sweep.json is not a readable sweep results file"),
     ('{"cells": {}}', r"sweep.json is not a lora-drop sweep results file")],
)
def test_unreadable_results_file(tmp_path, content, message):
    path = tmp_path / "sweep.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        sweep.load_results(str(path))


def test_share_that_drops_no_layer(tmp_path):
    options = sweep_options(tmp_path, "--shares", "0.1")
    with pytest.raises(ValueError, match=r"droppable share 0.1 drops no layer of this 4-layer model"):
        sweep.run_sweep(tiny_model(), ByteTokenizer(), options, log=quiet)
    assert not (tmp_path / "results").exists()


# -----------------------------------------------------------------------------
# Frontier and safe zone


def make_row(period, share, speedup, ppl_ratio):
    return {"period": period, "share": share, "n_droppable": round(30 * share), "n_layer": 30, "speedup": speedup,
            "ideal_speedup": speedup + 0.3, "kv_reduction": share / 2, "ppl": 10 * ppl_ratio, "full_ppl": 10.0,
            "ppl_ratio": ppl_ratio, "top1": 0.9, "kl": ppl_ratio - 1}


def make_cell(row):
    """A results-file cell record with the figures of a summary row."""
    return {"period": row["period"], "share": row["share"], "layers": list(range(1, row["n_droppable"] + 1)),
            "n_layer": row["n_layer"],
            "quality": {key: row[key] for key in ("ppl", "full_ppl", "ppl_ratio", "top1", "kl")},
            "speed": {key: row[key] for key in ("speedup", "ideal_speedup", "kv_reduction")},
            "settings": {"train": {"steps": 30, "period": row["period"], "layers": f"fraction:{row['share']}"}}}


QUALIFYING = [make_row(2, 0.25, 1.6, 1.04), make_row(4, 0.5, 1.8, 1.049), make_row(16, 0.75, 2.5, 1.3),
              make_row(2, 0.5, 1.4, 1.0), make_row(8, 0.5, 1.5, 1.2)]


def test_safe_schedule_is_fastest_qualifying():
    assert sweep.pick_safe_schedule(QUALIFYING) == QUALIFYING[1]


def test_safe_schedule_limits_inclusive():
    rows = [make_row(2, 0.25, 1.5, 1.05), make_row(4, 0.25, 1.49, 1.0), make_row(8, 0.25, 3.0, 1.0501)]
    assert sweep.pick_safe_schedule(rows) == rows[0]
    assert sweep.pick_safe_schedule(rows, max_ppl_ratio=1.1) == rows[2]


def test_safe_schedule_none():
    rows = [make_row(2, 0.25, 1.2, 1.01), make_row(8, 0.75, 2.2, 1.4), make_row(16, 0.75, 2.1, 1.6)]
    assert sweep.pick_safe_schedule(rows) is None


def test_pareto_front():
    front = sweep.pareto_front(QUALIFYING)
    assert front == [QUALIFYING[2], QUALIFYING[1], QUALIFYING[0], QUALIFYING[3]]
    assert QUALIFYING[4] not in front  # 1.8x at ratio 1.049 beats 1.5x at ratio 1.2 on both


def test_pareto_front_keeps_ties():
    rows = [make_row(2, 0.25, 1.5, 1.1), make_row(4, 0.25, 1.5, 1.1), make_row(8, 0.25, 1.5, 1.2)]
    assert sweep.pareto_front(rows) == rows[:2]


def test_report_names_safe_schedule(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    sweep.save_results(str(path), {"format": sweep.RESULTS_FORMAT,
                                   "cells": {str(i): make_cell(row) for i, row in enumerate(QUALIFYING)}})
    sweep.main(["--report", "--out", str(path), "--json"])

    captured = capsys.readouterr()
    assert "| period | share | layers | speedup | ideal | KV saved | ppl ratio | top-1 | KL | frontier |" in captured.err
    assert "| 4 | 50% | 15/30 | 1.80x | 2.10x | 25% | 1.049 | 90.0% | 0.0490 | * |" in captured.err
    assert "the fastest such schedule is period 4, share 50% (15 of 30 layers): 1.80x faster" in captured.err
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert (printed["verdict"]["safe"]["period"], printed["verdict"]["safe"]["share"]) == (4, 0.5)


def test_report_lists_frontier_when_none_qualifies(tmp_path, capsys):
    rows = [make_row(2, 0.25, 1.2, 1.01), make_row(8, 0.75, 2.2, 1.4), make_row(16, 0.75, 2.1, 1.6)]
    path = tmp_path / "sweep.json"
    sweep.save_results(str(path), {"format": sweep.RESULTS_FORMAT, "cells": {str(i): make_cell(r) for i, r in enumerate(rows)}})
    sweep.main(["--report", "--out", str(path), "--min-speedup", "1.5"])

    err = capsys.readouterr().err
    assert "no schedule of the 3 measured qualifies" in err
    frontier = err.split("quality-speed frontier (Pareto set), fastest first:\n")[1].splitlines()
    assert frontier[0].startswith("- period 8, share 75% (22 of 30 layers): 2.20x faster, perplexity ratio 1.400")
    assert frontier[1].startswith("- period 2, share 25% (8 of 30 layers): 1.20x faster")
    assert "period 16" not in "\n".join(frontier)


def test_report_notes_mixed_settings(tmp_path, capsys):
    cells = {str(i): make_cell(row) for i, row in enumerate(QUALIFYING[:2])}
    cells["1"]["settings"]["train"]["steps"] = 60
    path = tmp_path / "sweep.json"
    sweep.save_results(str(path), {"format": sweep.RESULTS_FORMAT, "cells": cells})
    sweep.main(["--report", "--out", str(path)])
    assert "the cells ran with different settings" in capsys.readouterr().err


def test_report_flags_speedup_above_ideal(tmp_path, capsys):
    rows = [make_row(2, 0.25, 1.2, 1.01), make_row(4, 0.5, 1.6, 1.1)]
    rows[1]["ideal_speedup"] = 1.4
    path = tmp_path / "sweep.json"
    sweep.save_results(str(path), {"format": sweep.RESULTS_FORMAT, "cells": {str(i): make_cell(r) for i, r in enumerate(rows)}})
    sweep.main(["--report", "--out", str(path)])

    err = capsys.readouterr().err
    assert "measured speedup exceeds the ideal one for period 4 share 50% (1.60x, ideal 1.40x);" in err
    assert "period 2 share 25%" not in err.split("note:")[1]


def test_report_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no sweep results at .*missing.json; run python sweep.py first"):
        sweep.main(["--report", "--out", str(tmp_path / "missing.json")])


# -----------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--periods", "0"], "invalid refresh period 0 in --periods: it must be an integer >= 1"),
        (["--periods", "4,x"], "invalid refresh period 'x' in --periods"),
        (["--shares", "1.0"], "invalid droppable share 1.0 in --shares: it must be a fraction between 0 and 1"),
        (["--shares", "0"], "invalid droppable share 0.0 in --shares"),
        (["--shares", "50%"], "invalid droppable share '50%' in --shares"),
        (["--periods", "200"], "--seq-len 128 must be larger than --period 200"),
        (["--steps", "0"], "invalid --steps 0"),
        (["--eval-length", "1"], "invalid --eval-length 1"),
        (["--speed-tokens", "1"], "invalid --speed-tokens 1: it must be >= 2"),
        (["--speed-repeats", "0"], "invalid --speed-repeats 0"),
        (["--max-ppl-ratio", "0.9"], "invalid --max-ppl-ratio 0.9"),
        (["--train-args", "--steps 5"], "--train-args sets --steps, which the sweep sets itself for each cell"),
        (["--train-args", "--per 5"], "--train-args sets --period"),
        (["--train-args", "--bogus 1"], "train_correctors.py has no option '--bogus'"),
        (["--train-args", "--lr 0"], "invalid --lr 0.0: it must be > 0"),
        (["--train-args", "'--lr"], "invalid --train-args"),
        (["--model", "other.gguf"], "--model needs --out PATH"),
        (["--data", "/nonexistent/text.txt"], "text file not found: /nonexistent/text.txt; check --data"),
    ],
)
def test_bad_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_grid_values_parsed():
    options = sweep.parse_args(["--periods", "8, 2,8", "--shares", "0.75,0.25"])
    assert options.periods == [8, 2]
    assert options.shares == [0.75, 0.25]
    assert sweep.parse_args([]).periods == [2, 4, 8, 16]


def test_every_option_has_help_text():
    for action in sweep.build_parser()._actions:
        assert action.help, f"option {action.option_strings} has no help text"
