"""Tokenizer, chat template and streaming detokenizer, checked against transformers as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_outputs import as_ids as _ids
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoinfer.loading import registry
from nanoinfer.loading.gguf import load_gguf_tokenizer
from nanoinfer.loading.gguf_tokenizer import GEMMA_CHAT_TEMPLATE
from nanoinfer.tokenizer import ChatTemplate, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world! How are you doing today?",
    "明月几时有，把酒问青天。不知天上宫阙，今夕是何年。",
    "def add(a, b):\n    return a + b  # sum 12345 and 0.5\n\n\tprint(add(1, 2))",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷, family 👨‍👩‍👧",
    "  leading spaces, trailing   \n\n\nnewlines and   runs of spaces  ",
    "Mixed: naïve café – “quotes” — § ≠ ∑; Ünïcödé, Ελληνικά, русский, العربية, हिन्दी",
    "I'm sure it's fine, they'll see; we've done it and you'd agree.",
]
STREAM_TEXTS = [
    "明月几时有，把酒问青天",
    "Rocket 🚀 then 👨‍👩‍👧 and 🇯🇵!",
    "Rare chars 𠀀𪚥 and ẞ, ǅ, 〄 ⿰",
    "plain ascii text with numbers 0123456789",
]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 明月 in English? 🌙"},
]


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return registry.gemma3_path()


@pytest.fixture(scope="module")
def gemma(gemma_path) -> Tokenizer:
    return load_gguf_tokenizer(gemma_path)


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)


# --- SmolLM2 (byte-level BPE) -----------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_encode_matches_transformers(smollm, hf_smollm, text):
    assert smollm.encode(text) == hf_smollm.encode(text)
    assert smollm.encode(text, add_special_tokens=False) == hf_smollm.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_decode_roundtrip(smollm, hf_smollm, text):
    ids = smollm.encode(text)
    assert smollm.decode(ids) == text
    assert smollm.decode(ids) == hf_smollm.decode(ids, skip_special_tokens=True)


def test_smollm_special_tokens(smollm):
    assert smollm.bos_token_id == 1 and smollm.id_to_token(1) == "<|im_start|>"
    assert smollm.eos_token_ids[0] == 2 and smollm.id_to_token(2) == "<|im_end|>"
    assert smollm.add_bos is False
    assert {0, 1, 2} <= smollm.special_ids
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # control tokens are matched whole
    assert smollm.decode(ids) == "user\nhi"
    assert smollm.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_smollm_digits_split_individually(smollm, hf_smollm):
    # SmolLM was trained with one pre-token per digit (HF repo: Digits(individual_digits) before
    # ByteLevel; llama.cpp pre-tokenizer "smollm"). transformers' GGUF loader ignores the "smollm"
    # pre-tokenizer, which only shows on numerics without digit merges, e.g. " ½".
    ids = smollm.encode("year 2024", add_special_tokens=False)
    assert [smollm.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]
    ours = smollm.encode("a ½", add_special_tokens=False)
    assert [smollm.decode([i]) for i in ours] == ["a", " ", "½"]
    assert hf_smollm.encode("a ½", add_special_tokens=False)[1] == smollm.token_to_id("Ġ\u00c2")  # " ½" kept whole


def test_smollm_chat_template_matches_transformers(smollm, hf_smollm):
    assert smollm.chat_template == hf_smollm.chat_template
    for messages in (CONVERSATION, CONVERSATION[1:]):  # with and without a system turn
        for gen in (True, False):
            ours = smollm.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_smollm.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs
    ours_ids = smollm.apply_chat_template(CONVERSATION, tokenize=True)
    assert ours_ids == _ids(hf_smollm.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True))


# --- Gemma 3 (SentencePiece BPE with byte fallback) ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + STREAM_TEXTS)
def test_gemma_encode_matches_transformers(gemma, hf_gemma, text):
    assert gemma.encode(text) == hf_gemma.encode(text)
    assert gemma.decode(gemma.encode(text)) == text


@pytest.mark.slow
def test_gemma_chat_template_matches_transformers(gemma, hf_gemma):
    # This GGUF carries no chat template; we fall back to Gemma 3's own turn format.
    assert gemma.chat_template == GEMMA_CHAT_TEMPLATE
    for gen in (True, False):
        ours = gemma.apply_chat_template(CONVERSATION, add_generation_prompt=gen)
        theirs = hf_gemma.apply_chat_template(
            CONVERSATION, add_generation_prompt=gen, tokenize=False, chat_template=GEMMA_CHAT_TEMPLATE
        )
        assert ours == theirs
    assert ours.startswith("<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?<end_of_turn>\n")
    ours_ids = gemma.apply_chat_template(CONVERSATION, tokenize=True)
    theirs_ids = hf_gemma.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, chat_template=GEMMA_CHAT_TEMPLATE
    )
    assert ours_ids == _ids(theirs_ids)
    assert ours_ids.count(gemma.bos_token_id) == 1  # the template writes BOS; encode must not add another


def test_gemma_special_tokens_and_bos(gemma):
    assert gemma.add_bos and gemma.bos_token_id == 2
    assert gemma.eos_token_ids == (1, 106)  # <eos> and <end_of_turn>
    assert gemma.encode("Hello")[0] == 2
    assert gemma.encode("<bos>Hello") == gemma.encode("Hello")  # never a double BOS
    assert gemma.encode("Hello", add_special_tokens=False)[0] != 2


def test_gemma_byte_fallback(gemma):
    ids = gemma.encode("𠀀𪚥", add_special_tokens=False)
    assert any(gemma.id_to_token(i).startswith("<0x") for i in ids)
    assert gemma.decode(ids) == "𠀀𪚥"


# --- streaming detokenization ----------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("which", ["smollm", "gemma"])
@pytest.mark.parametrize("text", STREAM_TEXTS + TEXTS)
def test_incremental_detokenizer(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1  # it really streams


def test_incremental_detokenizer_multibyte_split(smollm):
    # In byte-level BPE a single Chinese character can span several tokens: nothing is emitted
    # until the character is complete.
    ids = smollm.encode("把酒问", add_special_tokens=False)
    assert len(ids) > 3
    pieces = _stream(smollm, ids)
    assert "".join(pieces) == "把酒问"
    assert "" in pieces[:-1]


def test_incremental_detokenizer_special_tokens(smollm):
    ids = smollm.apply_chat_template(CONVERSATION[1:2], tokenize=True) + smollm.encode("Sure 👍", False) + [2]
    assert "".join(_stream(smollm, ids)) == smollm.decode(ids)
    kept = _stream(smollm, ids, skip_special_tokens=False)
    assert "".join(kept) == smollm.decode(ids, skip_special_tokens=False)


def test_incremental_detokenizer_incomplete_tail_flushes(smollm):
    ids = smollm.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(smollm)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == smollm.decode(ids[:-1])  # the broken tail comes out at the end, as decode gives it


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_incremental_detokenizer_property(smollm, text):
    ids = smollm.encode(text, add_special_tokens=False)
    pieces = _stream(smollm, ids)
    assert "".join(pieces) == smollm.decode(ids)
    # U+FFFD mid-stream only when the text itself decodes to one (bytes missing from the vocab)
    assert not any("\ufffd" in p for p in pieces[:-1]) or "\ufffd" in smollm.decode(ids)


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=49151), max_size=30))
def test_incremental_detokenizer_random_ids(smollm, ids):
    # Arbitrary ids can form invalid UTF-8; joined pieces must still equal the full decode.
    assert "".join(_stream(smollm, ids)) == smollm.decode(ids)


# --- chat template sandbox and compatibility -------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{{ messages.append(1) }}",  # immutable sandbox: no mutation of inputs
    ],
)
def test_template_sandbox_blocks_escapes(source):
    with pytest.raises(ValueError):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate("{% for x in %}")


def test_template_features_match_transformers(hf_smollm):
    source = (
        "{%- set ns = namespace(count=0) -%}"
        "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- continue -%}{%- endif -%}"
        "{%- set ns.count = ns.count + 1 -%}"
        "<{{ m.role }}>{{ m.content | tojson }}|{{ m | tojson(indent=2) }}\n"
        "{%- endfor -%}"
        "{%- if tools %}{{ tools | tojson }}{% endif -%}"
        "{{ ns.count }}{{ bos_token }}{{ eos_token }}"
        "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>{% endif %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "ü"}}}]
    ours = ChatTemplate(source, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}).render(
        CONVERSATION, add_generation_prompt=True, tools=tools, enable_thinking=False
    )
    theirs = hf_smollm.apply_chat_template(
        CONVERSATION,
        chat_template=source,
        add_generation_prompt=True,
        tokenize=False,
        tools=tools,
        enable_thinking=False,
    )
    assert ours == theirs
    assert "明月" in ours  # tojson keeps non-ASCII as-is


# --- HF directory loading ----------------------------------------------------------------------


def test_from_hf_dir_matches_transformers(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:3]:
        assert tok.encode(text) == hf.encode(text)
    assert tok.bos_token_id == hf.bos_token_id and tok.eos_token_ids[0] == hf.eos_token_id
    messages = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def test_from_hf_dir_template_file_and_bos_post_processor(tiny_tokenizer, tmp_path):
    from tokenizers import processors

    tiny_tokenizer.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("add_bos_token", None)
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tok = Tokenizer.from_hf_dir(tmp_path)
    backend = tok.backend
    bos = tok.bos_token
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos  # learned from the post-processor
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.encode(f"{bos}hello") == ids  # never a double BOS
