"""Chat rendering for the simple routes: reply spans found in one rendering equal those found by
rendering every prefix, and the work stays linear in the number of messages."""

import pytest
from transformers import AutoTokenizer

from actors import chat

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? Ünïcödé, emoji \U0001f600"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "6\\n\\nreally: six"},
    ],
    [{"role": "user", "content": "@@not-a-marker:0@@ <|im_end|> tricky"}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)  # the byte-level tokenizer with a ChatML template


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one turn", "many turns", "tricky text"])
def test_one_rendering_finds_the_spans_that_prefix_renderings_find(tokenizer, messages):
    linear = chat._reply_spans_in_one_rendering(tokenizer, messages)
    assert linear is not None and linear == chat._reply_spans_by_prefixes(tokenizer, messages)


def test_reply_spans_render_the_template_a_fixed_number_of_times(tokenizer):
    renders = []
    original = tokenizer.apply_chat_template

    def counting(*args, **kwargs):
        renders.append(1)
        return original(*args, **kwargs)

    tokenizer.apply_chat_template = counting
    try:
        messages = [{"role": r, "content": f"turn {i}"} for i in range(200) for r in ("user", "assistant")]
        datum = chat.chat_datum(tokenizer, messages, "cross_entropy", {})
    finally:
        del tokenizer.apply_chat_template
    assert len(renders) <= 3 and datum.loss_fn_inputs["weights"].sum() > 200


@pytest.mark.default_model
def test_the_default_models_template_agrees_too(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    for messages in CONVERSATIONS:
        assert chat._reply_spans_in_one_rendering(tokenizer, messages) == chat._reply_spans_by_prefixes(
            tokenizer, messages
        )
