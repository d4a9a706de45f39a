"""Continuous batching and streamed generation.

The decode-loop tests run a real tiny model in-process, where the test can see a request join a batch that
is already decoding. The streaming tests go through the real API and inference worker with the official
`openai` SDK and with raw server-sent events.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from tests.conftest import Api, wait_until
from training.decoding import DecodeLoop, GenerationRequest, held_back, sample

NO_CACHE = {"Cache-Control": "no-cache"}


@pytest.fixture(scope="module")
def gpt2(services: dict[str, str]) -> Any:
    from tasks import recipes

    return recipes.predictor("generation", Path(services["home"]) / "models" / "tiny-gpt2")


def _request(predictor: Any, prompt: str, max_tokens: int, **options: Any) -> GenerationRequest:
    return GenerationRequest(predictor.encode_prompts([prompt]), max_tokens, **{"temperature": 0.0, **options})


def _alone(predictor: Any, prompt: str, max_tokens: int, **options: Any) -> list[dict[str, Any]]:
    loop = DecodeLoop("alone", predictor, max_rows=8, idle_s=1)
    future = loop.submit(_request(predictor, prompt, max_tokens, **options))
    assert future is not None
    result: list[dict[str, Any]] = future.result(60)[0]
    return result


def test_requests_joining_a_running_decode_batch_get_the_same_answers_as_alone(gpt2: Any) -> None:
    prompts = ["the quick brown fox", "a", "once upon a time there was", "numbers: 1 2 3 4 5 6"]
    expected = [_alone(gpt2, p, 6) for p in prompts]
    long_expected = _alone(gpt2, "hello", 200)

    # The loop stops at its third step until the four requests are queued: on a busy machine the test could
    # otherwise wake after the long request had decoded all its 200 tokens, and nothing would run beside it.
    decoding, queued = threading.Event(), threading.Event()

    def pause_at_third_step(rows: int) -> None:
        if loop.steps == 3:
            decoding.set()
            queued.wait(30)

    loop = DecodeLoop("joined", gpt2, max_rows=8, idle_s=5, record=pause_at_third_step)
    long = loop.submit(_request(gpt2, "hello", 200))
    assert long is not None
    assert decoding.wait(30), "the first request never reached its third step"
    joined = [loop.submit(_request(gpt2, p, 6)) for p in prompts]
    queued.set()
    answers = [future.result(60)[0] for future in joined if future is not None]

    assert answers == expected
    assert long.result(60)[0] == long_expected
    # They ran beside the long request, which had decoded 3 steps before they came: one batch of five rows.
    assert loop.widest == 5, loop.widest


def test_decode_loop_keeps_each_requests_own_settings_in_one_batch(gpt2: Any) -> None:
    loop = DecodeLoop("mixed", gpt2, max_rows=16, idle_s=5)
    # A prompt whose greedy answer is plain text (a random model may also write partial characters).
    prompt, greedy = next((p, answer) for p in ("the end", "hello", "a b c", "once", "x y", "the sky")
                          if len((answer := _alone(gpt2, p, 8))[0]["text"].strip()) >= 6
                          and "\ufffd" not in answer[0]["text"])
    stop_at = greedy[0]["text"][3:6]
    requests = [
        _request(gpt2, prompt, 8),
        _request(gpt2, prompt, 8, stops=[stop_at]),
        _request(gpt2, "hello", 5, temperature=1.0, seed=7, n=3),
        _request(gpt2, "hello", 5, temperature=1.0, seed=7, n=3),
        _request(gpt2, "hello", 5, temperature=1.0, seed=8, n=3),
    ]
    futures = [loop.submit(request) for request in requests]
    plain, stopped, seeded, replayed, other = [f.result(60) for f in futures if f is not None]

    assert plain[0] == greedy
    # The stop string ends the answer before it, and is not part of the text.
    cut = greedy[0]["text"].index(stop_at)
    assert stopped[0][0]["text"] == greedy[0]["text"][:cut] and stopped[0][0]["finish_reason"] == "stop"
    assert len(seeded[0]) == 3 and seeded == replayed, "a seed drew differently beside other requests"
    assert seeded != other
    assert all(c["completion_tokens"] <= 5 for c in seeded[0])


def test_a_stream_gets_the_text_as_it_grows_without_a_stop_string() -> None:
    assert held_back("Hello wor", ["world!"]) == "Hello "
    assert held_back("Hello", ["lo!", "xyz"]) == "Hel"
    assert held_back("caf\ufffd", []) == "caf"
    assert held_back("plain text", ["STOP"]) == "plain text"


def test_nucleus_sampling_never_draws_outside_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.7, generator) for _ in range(300)}
    # 0.5 + 0.3 reaches 0.7: only the first two tokens are in the nucleus, and both get drawn.
    assert draws == {0, 1}
    assert sample(logits, 0.0, 1.0, None) == 0


def _client(api: Api, api_url: str) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=api.http.headers["authorization"].split()[-1],
                  default_headers=NO_CACHE, max_retries=0)


def test_the_openai_sdk_streams_chat_and_completions_with_the_same_text(api: Api, api_url: str) -> None:
    client = _client(api, api_url)
    messages: list[Any] = [{"role": "user", "content": "tell me a story"}]
    whole = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "not streamed"

    prompts = ["once upon a time", "the sky is"]
    plain = client.completions.create(model="tiny-gpt2", prompt=prompts, max_tokens=10, temperature=0, n=2)
    streamed = list(client.completions.create(model="tiny-gpt2", prompt=prompts, max_tokens=10, temperature=0,
                                              n=2, stream=True))
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {c.index: c.text for c in plain.choices}


def test_a_refused_stream_answers_with_its_http_error_and_sse_ends_with_done(api: Api, api_url: str) -> None:
    client = _client(api, api_url)
    with pytest.raises(openai.BadRequestError) as refused:
        # tiny-gpt2 has 256 positions.
        client.completions.create(model="tiny-gpt2", prompt="word " * 300, max_tokens=3, stream=True)
    assert "context of 256 tokens" in str(refused.value)

    with httpx.stream("POST", f"{api_url}/v1/completions", headers={**api.http.headers, **NO_CACHE}, timeout=60,
                      json={"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 5, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        inference_id = response.headers["x-llmos-inference-id"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" and e["id"] == f"cmpl-{inference_id}" for e in events)
    # The whole answer is kept too, for a client that polls instead.
    row = api.http.get(f"/v1/inferences/{inference_id}").json()
    assert row["status"] == "succeeded"
    assert row["response"]["choices"][0]["text"] == "".join(e["choices"][0]["text"] for e in events)


def test_a_failing_forward_pass_fails_its_requests_and_the_loop_serves_the_next(gpt2: Any) -> None:
    loop = DecodeLoop("failing", gpt2, max_rows=8, idle_s=5)
    # A token ID past the vocabulary: the embedding lookup raises in the prefill pass.
    broken = loop.submit(GenerationRequest([[10**7]], 4, temperature=0.0))
    assert broken is not None
    with pytest.raises(IndexError):
        broken.result(60)
    fine = loop.submit(_request(gpt2, "hello", 4))
    assert fine is not None and fine.result(60) == [_alone(gpt2, "hello", 4)]


def test_a_request_too_big_for_the_free_rows_is_not_overtaken_by_smaller_ones(gpt2: Any) -> None:
    loop = DecodeLoop("room", gpt2, max_rows=4, idle_s=5)
    running = loop.submit(_request(gpt2, "hello", 250, lane="a"))
    assert running is not None
    wait_until(lambda: loop.steps >= 2, 30, "the first request to be decoding", 0.001)
    # Four rows wanted, three free: it waits for the first request to end, and the later single-row
    # requests of other tenants wait behind it instead of filling the rows it waits for.
    big = loop.submit(_request(gpt2, "the end", 5, lane="b", n=4))
    small = [loop.submit(_request(gpt2, "once upon a time", 30, lane=f"c{i}")) for i in range(3)]
    assert big is not None and all(f is not None for f in small)
    assert not running.done(), "the first request ended before the others came: nothing was tested"
    big.result(120)
    assert not any(f.done() for f in small if f is not None), "a smaller request went first"
    assert [len(choices) for choices in big.result()] == [4]
    for future in small:
        assert future is not None and future.result(120)[0][0]["completion_tokens"] >= 1
    assert running.result(60)[0][0]["completion_tokens"] >= 1
    assert loop.widest <= 4
