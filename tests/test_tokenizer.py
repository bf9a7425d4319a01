"""The tiktoken-based tokenizers of pretrained.py against Hugging Face's on the same vocabularies."""

import json

import pytest

import pretrained

pytest.importorskip("transformers")

# Text where pre-tokenizers and byte-level BPE implementations tend to disagree.
HARD_CASES = {
    "digits": "Call 911 or +1-555-0100 before 2024-12-31.",
    "long_number": "12345678901234567890 and 3.14159265358979",
    "decimals": "0.5, .5, 5., 1e-5, 6.02e23, -273.15°C",
    "space_before_digit": "a 1, a  2, a   33, x\t4, y\n5, z \n 6",
    "digit_after_letters": "abc123def v2.0 x86_64 utf8 H2O",
    "unicode_numerals": "½ cup, x² + y³, Ⅻ o'clock, ٣ and ๓, ①②",
    "accents": "Café naïve résumé façade Ångström Øresund Łódź",
    "cjk": "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji": "Emoji 😀👍🏽 and a family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵.",
    "code": "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n\treturn None\n",
    "apostrophes": "It's, don't, we're, they've, I'm, you'll, he'd, IT'S, rock 'n' roll",
    "space_runs": "one  two   three    four     end",
    "tabs_and_newlines": "col1\tcol2\t\tcol3\n\nnext paragraph\r\nwindows line\n\n\n",
    "trailing_whitespace": "trailing spaces   ",
    "leading_whitespace": "   leading spaces",
    "only_whitespace": " \t\n ",
    "mixed_space_digit": " 1 2  3   4\t5\n6 7a 8b c9 10",
    "punctuation": "Hello!!! What?! ... --- (a) [b] {c} <d> @user #tag $5 %20 ^_^ ~/path",
    "special_token_text": "Text mentioning <|im_end|> and <|endoftext|> as plain words.",
    "control_bytes": "bell\x07 and \x04 and \x13 inside hel\x04lo",
    "supplementary_plane": "a\U00050000b \U0001F600 \U00010348",
    "empty": "",
}


def hf_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_python_docs_match_hf(smollm, hf_smollm_tokenizer, python_doc_paragraphs):
    _, tokenizer = smollm
    expected = hf_smollm_tokenizer(python_doc_paragraphs, add_special_tokens=False)["input_ids"]
    mismatches = [i for i, text in enumerate(python_doc_paragraphs) if tokenizer.encode(text) != expected[i]]
    assert len(python_doc_paragraphs) > 500
    assert not mismatches, f"{len(mismatches)} paragraphs differ, first: {python_doc_paragraphs[mismatches[0]]!r}"


@pytest.mark.parametrize("text", HARD_CASES.values(), ids=HARD_CASES.keys())
def test_hard_case_matches_hf(smollm, hf_smollm_tokenizer, text):
    _, tokenizer = smollm
    # By default our encode() keeps special-token text as text, as HF does with split_special_tokens.
    plain = hf_smollm_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.encode(text) == plain
    assert tokenizer.encode(text, allow_special=True) == hf_ids(hf_smollm_tokenizer, text)


# Text with bytes that have no token (0x04, 0x13, 0xF1) cannot round-trip: encode() drops them.
ROUND_TRIP_CASES = {name: text for name, text in HARD_CASES.items() if name not in ("control_bytes", "supplementary_plane")}


@pytest.mark.parametrize("text", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_hard_case_round_trip(smollm, text):
    _, tokenizer = smollm
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_python_docs_round_trip(smollm, python_doc_paragraphs):
    _, tokenizer = smollm
    for text in python_doc_paragraphs:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_whitespace_before_digit_stays_whole(smollm):
    # SmolLM2's Digits pre-tokenizer ends a part before every digit, so a space run before one is a piece.
    _, tokenizer = smollm
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("a  12 b")]
    assert pieces == ["a", "  ", "1", "2", " b"]


def test_bytes_without_token_are_dropped(smollm):
    # SmolLM2 has no token for byte 0x04; Hugging Face drops it and does not merge across it.
    _, tokenizer = smollm
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("hel\x04lo")]
    assert pieces == ["hel", "lo"]


def test_special_token_text_is_plain_by_default(smollm):
    _, tokenizer = smollm
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert im_end not in tokenizer.encode("<|im_end|>")
    assert tokenizer.encode("<|im_end|>", allow_special=True) == [im_end]


def test_smollm_special_ids(smollm):
    _, tokenizer = smollm
    assert tokenizer.special_tokens["<|endoftext|>"] == 0
    assert tokenizer.special_tokens["<|im_start|>"] == 1
    assert tokenizer.special_tokens["<|im_end|>"] == 2
    assert tokenizer.bos_id == 1
    assert tokenizer.eos_ids == {0, 2}
    assert tokenizer.vocab_size == 49152
    assert tokenizer.has_chat_template


@pytest.mark.parametrize("user, system", [
    ("What is the capital of France?", None),
    ("Écris un poème sur la mer 🌊", None),
    ("Add 12 and 30.", "You are a calculator."),
    ("Hi", ""),
])
def test_chat_template_matches_hf(smollm, hf_smollm_tokenizer, user, system):
    _, tokenizer = smollm
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    expected = hf_smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    assert tokenizer.apply_chat_template(user, system=system) == expected


def test_chat_template_default_system_prompt(smollm):
    _, tokenizer = smollm
    assert tokenizer.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = tokenizer.decode(tokenizer.apply_chat_template("Hi"))
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_system_prompt_from_template():
    literal = "{% if not system %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    built = "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    assert pretrained.default_system_prompt(literal) == "Be brief."
    assert pretrained.default_system_prompt(built) is None
    assert pretrained.default_system_prompt(None) is None


def test_stream_decoder_keeps_characters_whole(smollm):
    _, tokenizer = smollm
    text = "Emoji 😀👍🏽, accents é, CJK 日本語, and plain words."
    ids = tokenizer.encode(text)
    # The test needs a character split over tokens, or it would prove nothing.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = list(tokenizer.decode_stream(ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_flushes_incomplete_bytes(smollm):
    _, tokenizer = smollm
    partial = [i for i in tokenizer.encode("😀") if "\ufffd" in tokenizer.decode([i])][:1]
    decoder = tokenizer.stream_decoder()
    assert decoder.push(partial[0]) == ""
    assert decoder.flush() == "\ufffd"


def test_apply_chat_template_without_chatml_raises(tmp_path, train_tokenizer):
    train_tokenizer(tmp_path / "tokenizer.json", "gpt2")
    tokenizer = pretrained.tokenizer_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="ChatML"):
        tokenizer.apply_chat_template("Hi")


# -- tokenizer.json files -----------------------------------------------------------


@pytest.mark.parametrize("pre_tokenizer, normalizer", [("gpt2", None), ("smollm", None), ("split", "NFC")])
def test_tokenizer_json_matches_hf(tmp_path, train_tokenizer, python_doc_paragraphs, pre_tokenizer, normalizer):
    from tokenizers import Tokenizer as HFTokenizer

    path = tmp_path / "tokenizer.json"
    train_tokenizer(path, pre_tokenizer, normalizer=normalizer)
    reference = HFTokenizer.from_file(str(path))
    ours = pretrained.tokenizer_from_tokenizer_json(path)
    texts = [*HARD_CASES.values(), "Cafe\u0301 (decomposed accent)", *python_doc_paragraphs[::10]]
    for text in texts:
        assert ours.encode(text, allow_special=True) == reference.encode(text, add_special_tokens=False).ids, repr(text)


def test_tokenizer_json_merge_order_violation_raises(tmp_path, train_tokenizer):
    path = tmp_path / "tokenizer.json"
    train_tokenizer(path, "gpt2")
    data = json.loads(path.read_text())
    merges = data["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]  # the first two merges now make tokens in falling id order
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="merge order: merge 1"):
        pretrained.tokenizer_from_tokenizer_json(path)


def test_tokenizer_json_wordpiece_raises(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": None}))
    with pytest.raises(ValueError, match="'WordPiece'"):
        pretrained.tokenizer_from_tokenizer_json(path)


def test_tokenizer_json_unknown_pre_tokenizer_raises(tmp_path, train_tokenizer):
    path = tmp_path / "tokenizer.json"
    train_tokenizer(path, "gpt2")
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Whitespace"):
        pretrained.tokenizer_from_tokenizer_json(path)


def test_token_outside_byte_alphabet_raises():
    with pytest.raises(ValueError, match="'a b'"):
        pretrained.build_byte_level_encoding("bad", {"a": 0, "a b": 1}, [], {}, pretrained.GPT2_SPLIT)


def test_merge_to_unknown_token_raises():
    with pytest.raises(ValueError, match="'ab', which is not in the vocabulary"):
        pretrained.build_byte_level_encoding("bad", {"a": 0, "b": 1}, [("a", "b")], {}, pretrained.GPT2_SPLIT)
