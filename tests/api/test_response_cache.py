"""The response cache on the real stack: deterministic requests answered from Redis, per tenant and model
version, and never a non-deterministic one.

Whether the model was touched is read from the inference rows: every request that reaches a worker has one,
and a cache hit adds none.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
from sqlalchemy import func, select

from tests.api.test_inference_serving import _train_classifier
from tests.api.test_sharing import _early_in_a_minute, tenant_api
from tests.conftest import Api, wait_until

HEADER = "x-llmos-cache"


def _rows() -> int:
    from db.models import Inference
    from db.session import transaction

    with transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Inference)) or 0)


def _unique(text: str) -> str:
    # Tenants are new in every test, but a unique input keeps a rerun's answers apart too.
    return f"{text} {secrets.token_hex(4)}"


def _twice(api: Api, path: str, body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response, int]:
    """The same request twice: both answers, and how many of them reached a worker."""
    before = _rows()
    first = api.http.post(path, json=body)
    second = api.http.post(path, json=body)
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    return first, second, _rows() - before


def test_identical_deterministic_requests_are_answered_from_the_cache(api: Api) -> None:
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/embeddings", {"model": "tiny-bert", "input": [_unique("one"), _unique("two")]}),
        ("/v1/classifications", {"model": "tiny-bert", "input": _unique("fine"), "labels": ["good", "bad"]}),
        ("/v1/completions", {"model": "tiny-gpt2", "prompt": _unique("once"), "max_tokens": 4, "temperature": 0}),
        ("/v1/chat/completions", {"model": "tiny-gpt2", "max_tokens": 3, "temperature": 0,
                                  "messages": [{"role": "user", "content": _unique("hi")}]}),
        # A seed route shares its /v1 twin's entry and shapes the cached answer its own way.
        ("/llm-service", {"text": [_unique("nice")], "model": "tiny-bert"}),
    ]
    for path, body in requests:
        first, second, reached = _twice(api, path, body)
        assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "hit"), path
        assert second.content == first.content, path
        assert reached == 1, f"{path}: the hit reached a worker"


def test_a_different_request_or_tenant_misses(api_url: str, api: Api, make_key: Any) -> None:
    text = _unique("the same text")
    body = {"model": "tiny-bert", "input": text}
    assert api.http.post("/v1/embeddings", json=body).headers[HEADER] == "miss"
    assert api.http.post("/v1/embeddings", json=body).headers[HEADER] == "hit"
    # Any parameter is part of the request's identity.
    for changed in ({**body, "dimensions": 8}, {**body, "encoding_format": "base64"}, {**body, "input": [text, text]}):
        answer = api.http.post("/v1/embeddings", json=changed)
        assert answer.status_code == 200 and answer.headers[HEADER] == "miss", changed
    greedy = {"model": "tiny-gpt2", "prompt": _unique("go"), "max_tokens": 3, "temperature": 0}
    assert api.http.post("/v1/completions", json=greedy).headers[HEADER] == "miss"
    assert api.http.post("/v1/completions", json={**greedy, "max_tokens": 4}).headers[HEADER] == "miss"
    # A client may ask for the model's answer: it is neither looked up nor kept.
    before = _rows()
    for _ in range(2):
        fresh = api.http.post("/v1/embeddings", json=body, headers={"Cache-Control": "no-cache"})
        assert fresh.status_code == 200 and fresh.headers[HEADER] == "miss"
    assert _rows() == before + 2
    # Another tenant's identical request is its own.
    other = tenant_api(api_url, make_key, "someone-else")
    before = _rows()
    answer = other.http.post("/v1/embeddings", json=body)
    assert answer.status_code == 200 and answer.headers[HEADER] == "miss"
    assert _rows() == before + 1


def test_sampled_generation_is_never_cached(api: Api) -> None:
    for body in ({"model": "tiny-gpt2", "prompt": _unique("roll"), "max_tokens": 3, "temperature": 0.7},
                 # A seed makes it repeatable, but only greedy decoding is taken as deterministic.
                 {"model": "tiny-gpt2", "prompt": _unique("roll"), "max_tokens": 3, "temperature": 1.0, "seed": 3},
                 # The default temperature is 1.
                 {"model": "tiny-gpt2", "prompt": _unique("roll"), "max_tokens": 3}):
        first, second, reached = _twice(api, "/v1/completions", body)
        assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "miss"), body
        assert reached == 2, body


def test_a_deleted_models_answers_are_not_served(api: Api) -> None:
    from infra import cache

    model_id = _train_classifier(api)
    body = {"model": model_id, "input": [_unique("great"), _unique("awful")]}
    first, second, reached = _twice(api, "/v1/classifications", body)
    assert (first.headers[HEADER], second.headers[HEADER], reached) == ("miss", "hit", 1)
    generation = cache.generation(model_id)
    tenant_id = _tenant_of(model_id)
    digest = cache.digest("/v1/classifications", body)
    assert asyncio.run(_lookup(tenant_id, model_id, digest)) == second.content

    assert api.http.delete(f"/v1/models/{model_id}").status_code == 200
    wait_until(lambda: cache.generation(model_id) == generation + 1, 30, "the model's cache generation to move on")
    # Its cached answer can no longer be found, whoever asks (a request already past the model check too)...
    assert asyncio.run(_lookup(tenant_id, model_id, digest)) is None
    # ...and the request itself is refused as for any deleted model, not answered from the cache.
    gone = api.http.post("/v1/classifications", json=body)
    assert gone.status_code in (400, 404), gone.text
    assert gone.json()["error"]["code"] == "model_not_found"
    assert gone.headers.get(HEADER) != "hit"


def _tenant_of(model_id: str) -> str:
    from db.models import Model
    from db.session import transaction

    with transaction() as session:
        row = session.get(Model, model_id)
        assert row is not None and row.tenant_id is not None
        return row.tenant_id


async def _lookup(tenant_id: str, model_id: str, digest: str) -> bytes | None:
    from infra import cache

    try:
        found = await cache.lookup(tenant_id, model_id, digest)
        assert found is not None, "the cache is off or unreachable"
        return found.body
    finally:
        await cache.close()  # its connections belong to this call's event loop


def test_hits_count_against_the_tenants_token_limit(api_url: str, make_key: Any) -> None:
    client = tenant_api(api_url, make_key, "cached-tokens", tpm=300)
    body = {"model": "tiny-gpt2", "prompt": _unique("a a a"), "max_tokens": 6, "temperature": 0}
    wait_until(_early_in_a_minute, 15, "a fresh rate-limit minute")
    first = client.http.post("/v1/completions", json=body)
    assert first.status_code == 200 and first.headers[HEADER] == "miss", first.text
    used = first.json()["usage"]["total_tokens"]
    remaining = [int(first.headers["x-ratelimit-remaining-tokens"])]
    for _ in range(2):
        hit = client.http.post("/v1/completions", json=body)
        assert hit.status_code == 200 and hit.headers[HEADER] == "hit", hit.text
        remaining.append(int(hit.headers["x-ratelimit-remaining-tokens"]))
    # Each hit costs what the answer used, as the model's answer did.
    assert remaining[1] - remaining[2] == used
    assert remaining[0] - remaining[1] == used


def test_the_cache_keeps_a_tenant_within_its_byte_budget(services: dict[str, str]) -> None:
    from core.settings import get_settings
    from infra import cache

    settings = get_settings()
    saved = settings.response_cache_bytes
    tenant = f"budget-{secrets.token_hex(4)}"
    settings.response_cache_bytes = 8 * 1000
    body = b"x" * 900  # an eighth of the budget at most, with its header

    async def fill() -> list[bool]:
        try:
            stored = []
            for i in range(20):
                found = await cache.lookup(tenant, "tiny-bert", f"d{i}")
                assert found is not None and found.body is None
                stored.append(await cache.store(tenant, "tiny-bert", f"d{i}", found.generation, body, 7))
                if i >= 1:
                    # Used again and again: the least recently used entries go first, not the oldest.
                    again = await cache.lookup(tenant, "tiny-bert", "d0")
                    assert again is not None and again.body == body and again.tokens == 7
            too_big = await cache.store(tenant, "tiny-bert", "big", "0", b"y" * 1200, None)
            return [*stored, too_big]
        finally:
            await cache.close()

    async def present() -> list[str]:
        try:
            found = [(i, await cache.lookup(tenant, "tiny-bert", f"d{i}")) for i in range(20)]
            return [f"d{i}" for i, entry in found if entry is not None and entry.body is not None]
        finally:
            await cache.close()

    try:
        stored = asyncio.run(fill())
        kept = asyncio.run(present())
    finally:
        settings.response_cache_bytes = saved
    assert stored == [True] * 20 + [False]
    assert cache.tenant_bytes(tenant) <= 8 * 1000
    assert kept == ["d0", *(f"d{i}" for i in range(13, 20))]
