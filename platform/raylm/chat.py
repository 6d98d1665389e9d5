"""Conversations for supervised fine-tuning (SFT), and the chat template serving renders.

A chat dataset's record keeps its conversation in `text`, one message after another, each
opened by a marker line (`<|user|>`, `<|assistant|>`, `<|system|>`):

    <|user|>
    Who wrote "Of Man's first disobedience"?
    <|assistant|>
    Milton.

so that every data step (normalize, fix_unicode, pii, quality, language, both dedups) works on
it as on any document: dedup compares whole conversations, pii masks every turn. `parse` reads
the messages back. A preference pair (DPO) is the conversation with its chosen answer last, then a
`<|rejected|>` line and the rejected answer (`to_pair_text`, `parse_pair`); a rated answer (KTO)
is the conversation with the rated answer last, then a `<|rated|>` line and `good` or `bad`
(`to_rated_text`, `parse_rated`: the rating is part of the record, so dedup_exact keeps one copy
of an answer rated the same twice and both of one rated good and bad); `encode_answer`
tokenizes a side with only its last answer trained.

`encode` turns a conversation into token ids and a loss mask with the model's chat template,
the one the serving engine renders (`LMEngine.render_chat`): for every assistant message, the
conversation before it rendered with the generation prompt (what serving feeds the model; not
trained) and then the message itself up to the template's end of turn (trained: the model learns
to answer and to stop). Each part is tokenized as serving tokenizes a prompt
(`add_special_tokens=False`), so a one-turn example's prompt ids are exactly the ids the served
model sees.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

ROLES = ("system", "user", "assistant")
MARKERS = {f"<|{r}|>": r for r in ROLES}
# A preference pair's record: the conversation with the chosen answer last, then this line and
# the rejected answer (`to_pair_text`, `parse_pair`).
REJECTED = "<|rejected|>"
# A rated answer's record (KTO): the conversation with the rated answer last, then this line and
# `good` or `bad` (`to_rated_text`, `parse_rated`).
RATED = "<|rated|>"
RATINGS = {"good": True, "bad": False}

# Serving's template when neither the deploy config nor the tokenizer has one, and the template
# a chat dataset's tokenizer gets when its tokenizer has none: `role: content` lines, the end of
# an answer marked with the EOS token (what a fine-tuned model learns to emit, and where the
# serving engine stops). The generation prompt ends with the space after `assistant:`, so an
# answer is exactly the message content the conversation holds: a served answer stored by
# /v1/feedback renders back to the same text. (Templates render with Jinja's trim_blocks, as
# transformers renders them: a newline right after a `{% ... %}` tag is dropped, hence the
# expression.)
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class ConversationError(ValueError):
    """A record that is not a usable conversation; `reason` is a short slug for the counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _content(value: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ConversationError("content_not_text", "a message's content must be a string or a list of text parts")


def check(messages: Any) -> list[dict[str, str]]:
    """`messages` as a clean list of {role, content}; ConversationError when it cannot be trained
    on: not a list of messages, a role other than system / user / assistant, an empty
    conversation, or one that does not end with an assistant message (nothing to learn after it)."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            raise ConversationError("messages_not_a_list", "not JSON") from None
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages_not_a_list", "expected a non-empty list of {role, content}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ConversationError("messages_not_a_list", "each message needs a role and a content")
        if m["role"] not in ROLES:
            raise ConversationError("unknown_role", f"role {m['role']!r} (expected one of {', '.join(ROLES)})")
        text = _content(m.get("content"))
        if any(line in MARKERS or line in (REJECTED, RATED) for line in text.split("\n")):
            raise ConversationError("marker_in_content", "a line of a message is a role marker like <|user|>")
        out.append({"role": m["role"], "content": text})
    if out[-1]["role"] != "assistant":
        raise ConversationError("no_final_answer", "the conversation must end with an assistant message")
    return out


def to_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)


def parse(text: str) -> list[dict[str, str]]:
    """The messages of a record's `text` (after the data steps), checked like `check`."""
    messages: list[dict[str, Any]] = []
    for line in (text or "").split("\n"):
        if line in MARKERS:
            messages.append({"role": MARKERS[line], "lines": []})
        elif messages:
            messages[-1]["lines"].append(line)
        elif line.strip():
            raise ConversationError("text_before_first_role", "the text does not start with a role marker")
    return check([{"role": m["role"], "content": "\n".join(m["lines"])} for m in messages])


def answer_of(value: Any) -> str:
    """A preference record's answer: a string (or text parts), or a list of messages whose last is
    the answer (TRL's conversational shape)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "role" in value[-1]:
        if value[-1].get("role") != "assistant":
            raise ConversationError("answer_not_from_assistant", "the last message of an answer must be the "
                                    "assistant's")
        value = value[-1].get("content")
    if not isinstance(value, (str, list)):
        raise ConversationError("answer_not_text", "an answer must be a string or a list of messages")
    return _content(value)


def to_pair_text(messages: list[dict[str, str]], rejected: str) -> str:
    """A preference pair as a record's `text`: the conversation ending with the chosen answer,
    then the rejected answer after a `<|rejected|>` line."""
    return f"{to_text(messages)}\n{REJECTED}\n{rejected}"


def parse_pair(text: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The (chosen, rejected) conversations of a preference pair's `text`: the same messages up to
    the last answer, which differs. ConversationError when it is no pair (no_rejected_answer) or
    both answers are the same text after the data steps (chosen_equals_rejected: nothing to learn)."""
    lines = (text or "").split("\n")
    if REJECTED not in lines:
        raise ConversationError("no_rejected_answer", f"a preference pair needs a {REJECTED} line")
    cut = len(lines) - 1 - lines[::-1].index(REJECTED)
    chosen = parse("\n".join(lines[:cut]))
    rejected = "\n".join(lines[cut + 1:])
    if rejected == chosen[-1]["content"]:
        raise ConversationError("chosen_equals_rejected", "the chosen and the rejected answer are the same")
    return chosen, [*chosen[:-1], {"role": "assistant", "content": _content(rejected)}]


def to_rated_text(messages: list[dict[str, str]], good: bool) -> str:
    """A rated answer as a record's `text`: the conversation ending with the answer, then a
    `<|rated|>` line and `good` or `bad`."""
    return f"{to_text(messages)}\n{RATED}\n{'good' if good else 'bad'}"


def parse_rated(text: str) -> tuple[list[dict[str, str]], bool]:
    """The conversation of a rated answer's `text` and whether the answer was rated good.
    ConversationError when it is no rated answer (no_rating: no `<|rated|>` line, or a rating
    other than good or bad after the data steps)."""
    lines = (text or "").split("\n")
    if RATED not in lines:
        raise ConversationError("no_rating", f"a rated answer needs a {RATED} line")
    cut = len(lines) - 1 - lines[::-1].index(RATED)
    rating = "\n".join(lines[cut + 1:]).strip()
    if rating not in RATINGS:
        raise ConversationError("no_rating", f"the rating after {RATED} must be good or bad, not {rating[:20]!r}")
    return parse("\n".join(lines[:cut])), RATINGS[rating]


def renderer(template: str, special_tokens: dict[str, Any]) -> Callable[[list[dict[str, str]], bool], str]:
    """messages, add_generation_prompt -> the rendered text, as `tokenizer.apply_chat_template(...,
    tokenize=False)` renders it (the same Jinja environment, with the tokenizer's special tokens)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt, **special_tokens)
        return rendered[0]

    return render


def segments(messages: list[dict[str, str]], render: Callable[[list[dict[str, str]], bool], str]
             ) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) parts: everything before an assistant
    message (with the generation prompt) untrained, the message to its end of turn trained.
    ConversationError (template_error, template_not_incremental) when the template fails or
    renders a longer conversation as something other than the shorter one plus more text."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prompt = render(messages[:i], True)
            full = render(messages[: i + 1], False)
        except Exception as e:  # noqa: BLE001 - a template's raise_exception, or a Jinja error
            raise ConversationError("template_error", str(e)[:200]) from None
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConversationError("template_not_incremental",
                                    "the chat template does not render the conversation so far as a prefix")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(t, trained) for t, trained in out if t]


def encode(messages: list[dict[str, str]], render: Callable[[list[dict[str, str]], bool], str],
           encode_text: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask: 1 where the token is trained) of a checked conversation."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments(messages, render):
        part = encode_text(text)
        ids += part
        mask += [int(trained)] * len(part)
    return ids, mask


def encode_answer(messages: list[dict[str, str]], render: Callable[[list[dict[str, str]], bool], str],
                  encode_text: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation where only its last answer counts (preference
    pairs): the conversation before it rendered with the generation prompt and tokenized whole, as
    serving tokenizes a prompt (mask 0), then the answer to its end of turn (mask 1)."""
    try:
        prompt = render(messages[:-1], True)
        full = render(messages, False)
    except Exception as e:  # noqa: BLE001 - a template's raise_exception, or a Jinja error
        raise ConversationError("template_error", str(e)[:200]) from None
    if not full.startswith(prompt):
        raise ConversationError("template_not_incremental",
                                "the chat template does not render the conversation so far as a prefix")
    head, answer = encode_text(prompt), encode_text(full[len(prompt):])
    return head + answer, [0] * len(head) + [1] * len(answer)


def template_of(configured: Optional[str], tokenizer_template: Any) -> str:
    """The chat template in use: the config's (a chat dataset's, a deploy config's), else the
    tokenizer's own (a string; a dict of named templates gives `default`), else raylm's default.
    The data job, the serving engine and evaluation all pick it so."""
    if configured:
        return configured
    if isinstance(tokenizer_template, dict):
        tokenizer_template = tokenizer_template.get("default")
    return tokenizer_template or DEFAULT_CHAT_TEMPLATE
