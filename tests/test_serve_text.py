"""The server's pure parts: stop strings over text in pieces, a reply's ids to reasoning/content deltas with the
tiny model's DeepSeek-R1-style tokenizer, and the request schemas (strict types, the offending field named)."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from compute.serve.errors import APIError
from compute.serve.schemas import SamplingDefaults, parse_chat, parse_completion, sampling_params, stop_strings
from compute.serve.text import ReplyText, StopMatcher, prompt_opens_reasoning, thinks

ALPHABET = "ab c\n✓é日🙂<>/think"


@pytest.fixture(scope="module")
def tokenizer(tiny_q):
    return AutoTokenizer.from_pretrained(tiny_q)


def random_pieces(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_stop_matcher_cuts_at_the_first_stop_string_however_the_text_arrives():
    rng = random.Random()
    for _ in range(300):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
        stops = {"".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))}
        stops = tuple(stops)
        matcher = StopMatcher(stops)
        out = "".join(matcher.feed(piece) for piece in random_pieces(rng, text)) + matcher.finish()
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert out == (text[: min(hits)] if hits else text), (text, stops)
        assert matcher.stopped == bool(hits)


def split_expected(text: str, reasoning: bool) -> tuple[str, str]:
    """The reasoning and answer of ``text``, tags dropped, computed with plain string operations."""
    thought, answer = "", ""
    while text:
        tag = "</think>" if reasoning else "<think>"
        head, found, text = text.partition(tag)
        if reasoning:
            thought += head
        else:
            answer += head
        if not found:
            break
        reasoning = not reasoning
    return thought, answer


def test_reply_text_streams_reasoning_and_content_without_splitting_characters(tokenizer):
    rng = random.Random()
    assert thinks(tokenizer)
    for _ in range(40):
        pieces = ["a", " b", "é", "日本", "🙂", "\n", "<think>", "</think>", "ok"]
        text = "".join(rng.choice(pieces) for _ in range(20))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        opens = rng.random() < 0.5
        reply = ReplyText(tokenizer, reasoning=opens)
        deltas = [reply.add(i) for i in ids] + [reply.finish()]
        for delta in deltas:  # no delta ends in half a character
            assert not delta.reasoning.endswith("\ufffd") and not delta.content.endswith("\ufffd")
        got = ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas))
        assert got == split_expected(text, opens)
        assert reply.tokens == len(ids)


def test_reply_text_stops_trims_and_counts_the_tokens_up_to_the_match(tokenizer):
    rng = random.Random()
    for _ in range(40):
        text = "".join(rng.choice(["ab", " c", "é", "日", "xy", "\n"]) for _ in range(15))
        at = rng.randrange(1, len(text) - 2)
        stop = text[at : at + rng.randint(1, 2)]
        cut = text.find(stop)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = ReplyText(tokenizer, stop=(stop,))
        out = ""
        for i in ids:
            out += reply.add(i).content
            if reply.stopped:
                break
        out += reply.finish().content
        assert reply.stopped and out == text[:cut]
        # the last id taken is the one whose text completed the stop string
        assert tokenizer.decode(ids[: reply.tokens]).find(stop) == cut
        assert tokenizer.decode(ids[: reply.tokens - 1]).find(stop) == -1
        assert reply.add(ids[0]).content == ""  # after a stop nothing more comes


def test_the_tiny_models_template_opens_reasoning(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]  # fmt: skip
    assert prompt_opens_reasoning(tokenizer, list(ids))
    assert not prompt_opens_reasoning(tokenizer, tokenizer("plain text", add_special_tokens=False)["input_ids"])


DEFAULTS = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=0, repetition_penalty=1.0, max_tokens=77)


def chat_body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_requests_take_the_servers_defaults_for_what_they_leave_out():
    request = parse_chat(chat_body())
    assert sampling_params(request, DEFAULTS, max_tokens=None).max_new_tokens == 77
    seed = random.randrange(2**40)
    request = parse_chat(chat_body(temperature=0, top_p=0.5, top_k=-1, seed=seed, stop="x", max_tokens=3))
    params = sampling_params(request, DEFAULTS, max_tokens=request.max_tokens)
    assert (params.temperature, params.top_p, params.top_k, params.seed, params.max_new_tokens) == (0, 0.5, 0, seed, 3)
    assert stop_strings(request) == ("x",)
    parts = parse_chat(chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}]))  # fmt: skip
    assert parts.messages[0].text() == "ab"
    assert parse_completion(b'{"model": "m", "prompt": [[5, 6]]}').prompt_value() == [5, 6]
    assert parse_completion(b'{"model": "m", "prompt": ["p"]}').prompt_value() == "p"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": "0.5"}, "temperature"),  # strict: a number must be a JSON number
        ({"max_tokens": 1.0}, "max_tokens"),
        ({"stream": "true"}, "stream"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop.0"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content.0.type"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as caught:
        parse_chat(chat_body(**fields))
    assert caught.value.status == 400 and caught.value.param == param, caught.value.body()


def test_bodies_that_are_not_a_request_are_400():
    lone_surrogate = '{"model": "\ud800"}'.encode("utf-8", "surrogatepass")
    for body in [b"", b"{", b"[]", b"null", b'{"model": "m"}', bytes(range(256)), lone_surrogate]:
        with pytest.raises(APIError) as caught:
            parse_chat(body)
        assert caught.value.status == 400 and caught.value.message
    for prompt in ["[]", "[[1], [2]]", "[-1]", '["a", "b"]', "3"]:
        with pytest.raises(APIError):
            parse_completion(f'{{"model": "m", "prompt": {prompt}}}'.encode())
