"""Online inference at speed: concurrent callers batched in one threaded worker, a memory-budgeted model cache.

The stack tests talk to the real API and inference worker and read its log for the batches it ran (the
worker logs one line per shared forward pass). The batcher and cache tests run in-process with real tiny
models, where the test can hold a batch or a load open and check exactly what happened meanwhile.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import Api, Process, wait_until
from tests.data import NEGATIVE, POSITIVE, SUBJECTS, jsonl, sentiment_rows

BATCH_LINE = re.compile(r"batch (\S+) (\S+) (\S+): (\d+) requests, (\d+) inputs")
DECODE_LINE = re.compile(r"decode \S+: \d+ requests \(\d+ sequences\) joined (\d+) in flight")


def batches_in_log(log: str, model_id: str, method: str) -> list[tuple[int, int]]:
    """(requests, inputs) of each batch the worker logged for `model_id`'s `method`, oldest first."""
    return [(int(m[4]), int(m[5])) for m in BATCH_LINE.finditer(log) if m[3] == model_id and m[2] == method]


def concurrently(calls: Sequence[Any], workers: int) -> list[Any]:
    """Run the callables all at once (released together by a barrier); their results in order."""
    barrier = threading.Barrier(len(calls))

    def start(call: Any) -> Any:
        barrier.wait(30)
        return call()

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(start, calls))


NO_CACHE = {"Cache-Control": "no-cache"}


def _train_classifier(api: Api) -> str:
    # As the lifecycle test trains it: enough rows and epochs that the random-init model learns with any
    # batch order (length-grouped batches of this data hold few lengths, so often one label each).
    file_id = api.upload(jsonl(sentiment_rows(120))).json()["id"]
    created = api.http.post("/v1/fine_tuning/jobs", json={
        "training_file": file_id, "model": "tiny-bert", "seed": 7,
        "hyperparameters": {"n_epochs": 4, "batch_size": 8, "learning_rate": 3e-3}})
    assert created.status_code == 200, created.text
    done = api.wait_status(created.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    model_id: str = done["fine_tuned_model"]
    return model_id


def test_concurrent_classification_callers_get_their_own_answers_from_shared_batches(
    api: Api, stack: dict[str, Process]
) -> None:
    model_id = _train_classifier(api)
    texts = [f"{subject} was {word}" + " really" * (i % 3)
             for i, (subject, word) in enumerate((s, w) for s in SUBJECTS for w in POSITIVE + NEGATIVE)][:40]
    # 32 callers; every fourth sends a list of two, so results must come back per caller and in order.
    requests = [[texts[i]] if i % 4 else [texts[i], texts[32 + i // 4]] for i in range(32)]
    http = httpx.Client(base_url=str(api.http.base_url), headers=dict(api.http.headers), timeout=120,
                        limits=httpx.Limits(max_connections=40))
    log = stack["worker-inference"].log_path

    def classify(inputs: list[str]) -> Any:
        # `no-cache`: the answers alone must come from the model too, not from the cache the batch filled.
        return http.post("/v1/classifications", json={"model": model_id, "input": inputs}, headers=NO_CACHE)

    answers = concurrently([lambda inputs=inputs: classify(inputs) for inputs in requests], 32)
    concurrent_log = log.read_text(errors="replace")
    assert [a.status_code for a in answers] == [200] * 32, [a.text for a in answers if a.status_code != 200]

    for inputs, answer in zip(requests, answers, strict=True):
        alone = classify(inputs).json()["data"]
        got = answer.json()["data"]
        assert [d["index"] for d in got] == list(range(len(inputs)))
        assert [d["label"] for d in got] == [d["label"] for d in alone]
        for mine, reference in zip(got, alone, strict=True):
            # Padding to a longer neighbour changes float sums in the last digits only.
            assert mine["score"] == pytest.approx(reference["score"], abs=1e-4)
    # The model learnt its task, so these are real answers rather than one constant.
    labels = {text: d["label"] for inputs, a in zip(requests, answers, strict=True)
              for text, d in zip(inputs, a.json()["data"], strict=True)}
    assert labels["the food was great"] == "pos" and labels["the food was awful"] == "neg"

    batches = batches_in_log(concurrent_log, model_id, "predict")
    assert sum(r for r, _ in batches) == 32 and sum(n for _, n in batches) == 40, batches
    assert max(r for r, _ in batches) > 1, f"no two requests shared a forward pass: {batches}"
    assert all(n <= 32 for _, n in batches), batches
    # 32 cold first requests, one load.
    assert concurrent_log.count(f"loaded classification:{model_id} ") == 1


def _completion(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/completions" if "prompt" in body else "/v1/chat/completions",
                         json={"model": "tiny-gpt2", **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _answers(result: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(c["text"] if "text" in c else c["message"]["content"], c["finish_reason"],
             result["usage"]["completion_tokens"]) for c in result["choices"]]


def test_generation_callers_with_different_parameters_get_their_own_answers(
    api: Api, stack: dict[str, Process]
) -> None:
    prompts = ["hello", "the quick brown fox", "a", "what color is the sky ?", "once upon a time there was",
               "b c d", "numbers: 1 2 3", "the end"]
    bodies: list[dict[str, Any]] = [
        *({"prompt": p, "max_tokens": 4, "temperature": 0} for p in prompts[:4]),
        *({"prompt": p, "max_tokens": 7, "temperature": 0} for p in prompts[4:]),
        {"prompt": ["hello", "the end"], "max_tokens": 3, "temperature": 0},
        {"prompt": "hello", "max_tokens": 5, "temperature": 1.0, "seed": 1, "n": 2},
        {"prompt": "hello", "max_tokens": 5, "temperature": 1.0, "seed": 2},
        {"messages": [{"role": "user", "content": "say something"}], "max_tokens": 5, "temperature": 0},
        {"messages": [{"role": "user", "content": "tell me more about it"}], "max_tokens": 5, "temperature": 0},
    ]
    http = httpx.Client(base_url=str(api.http.base_url), headers=dict(api.http.headers), timeout=120)
    log = stack["worker-inference"].log_path
    before = len(log.read_text(errors="replace"))
    # A long first request keeps the model busy while the others arrive, so they queue and share batches.
    blocker = threading.Thread(target=_completion, args=(http, {"prompt": "x", "max_tokens": 200,
                                                                 "temperature": 0}))
    blocker.start()
    answers = concurrently([lambda body=body: _completion(http, body) for body in bodies], len(bodies))
    blocker.join()
    during = log.read_text(errors="replace")[before:]

    for body, answer in zip(bodies, answers, strict=True):
        # Greedy answers do not depend on the batch; seeded ones draw from their own generator: replay exactly.
        assert _answers(answer) == _answers(_completion(http, body)), body
        choices = (len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1) * body.get("n", 1)
        assert len(answer["choices"]) == choices
        assert answer["usage"]["completion_tokens"] <= body["max_tokens"] * choices
    assert answers[9]["choices"][0]["text"] != answers[10]["choices"][0]["text"], "seeds 1 and 2 drew alike"
    # Requests joined the decode batch while others were in it (the worker logs each admission).
    joined = [int(m[1]) for m in DECODE_LINE.finditer(during) if m[0].startswith("decode tiny-gpt2")]
    assert any(n > 0 for n in joined), f"no request joined a running decode batch:\n{during[-3000:]}"


def test_a_failing_request_fails_alone_in_its_batch(api: Api, stack: dict[str, Process]) -> None:
    http = httpx.Client(base_url=str(api.http.base_url), headers=dict(api.http.headers), timeout=120)

    def complete(prompt: str) -> httpx.Response:
        return http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": prompt, "max_tokens": 3,
                                                  "temperature": 0})

    # tiny-gpt2 has 256 positions: this prompt and its 3 new tokens cannot fit.
    prompts = ["good", "fine", "word " * 300, "ok", "yes"]
    answers = concurrently([lambda p=p: complete(p) for p in prompts], len(prompts))
    assert [a.status_code for a in answers] == [200, 200, 400, 200, 200], [a.text for a in answers]
    assert "exceed the model's context of 256 tokens" in answers[2].json()["error"]["message"]


def _model_process(worker: Process) -> Any:
    """The inference worker's model process (its spawned child that is not multiprocessing's tracker)."""
    import psutil

    found = [child for child in psutil.Process(worker.popen.pid).children(recursive=True)
             if "spawn_main" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(child.cmdline())]
    return found[0] if len(found) == 1 else None


def test_a_killed_model_process_is_replaced_and_serves_the_next_requests(
    api: Api, stack: dict[str, Process]
) -> None:
    worker = stack["worker-inference"]
    body = {"model": "tiny-gpt2", "prompt": "the food", "max_tokens": 4, "temperature": 0}
    # `no-cache`: each request must reach a model process, not the response cache.
    before = api.http.post("/v1/completions", json=body, headers=NO_CACHE)
    assert before.status_code == 200, before.text
    first = wait_until(lambda: _model_process(worker), 30, "the worker's model process")
    assert worker.popen.poll() is None

    first.kill()  # as the kernel's OOM killer or a segfault in a kernel would
    first.wait(10)

    # The worker outlives it: the next requests start a fresh model process and get the same answers.
    after = [api.http.post("/v1/completions", json=body, headers=NO_CACHE) for _ in range(3)]
    assert [r.status_code for r in after] == [200] * 3, [r.text for r in after]
    assert {r.json()["choices"][0]["text"] for r in after} == {before.json()["choices"][0]["text"]}
    second = wait_until(lambda: _model_process(worker), 30, "a new model process")
    assert second.pid != first.pid and worker.popen.poll() is None
    assert f"model process {first.pid} exited" in worker.log_path.read_text(errors="replace")


def test_a_stopped_inference_worker_exits_with_its_model_process(api: Api, stack: dict[str, Process]) -> None:
    import signal
    import subprocess

    body = {"model": "tiny-gpt2", "prompt": "the food", "max_tokens": 2, "temperature": 0}
    assert api.http.post("/v1/completions", json=body, headers=NO_CACHE).status_code == 200
    worker = stack["worker-inference"]
    model_process = wait_until(lambda: _model_process(worker), 30, "the worker's model process")

    # As `llmos up` stops it: SIGTERM to its process group, a warm shutdown, then the model process stops.
    os.killpg(worker.popen.pid, signal.SIGTERM)
    try:
        worker.popen.wait(15)
        exited = True
    except subprocess.TimeoutExpired:
        exited = False
    log_tail = worker.tail(20)
    # Replaced before any assertion (what is left of the old one killed), so a failure here leaves later
    # tests an inference worker.
    stack["worker-inference"] = worker.respawn("worker-inference-2")
    assert exited, f"the inference worker did not exit within 15 s of SIGTERM:\n{log_tail}"
    assert not model_process.is_running() or model_process.status() == "zombie"
    assert api.http.post("/v1/completions", json=body, headers=NO_CACHE).status_code == 200


def test_prefer_wait_0_answers_202_then_the_poll_has_the_response(api: Api) -> None:
    body = {"model": "tiny-gpt2", "prompt": "hello there", "max_tokens": 4, "temperature": 0}
    accepted = api.http.post("/v1/completions", json=body, headers={"Prefer": "wait=0"})
    assert accepted.status_code == 202, accepted.text
    handle = accepted.json()
    assert handle["object"] == "inference" and handle["id"].startswith("inf_")
    assert handle["status"] in ("queued", "running") and handle["response"] is None

    def finished() -> dict[str, Any] | None:
        row: dict[str, Any] = api.http.get(f"/v1/inferences/{handle['id']}").json()
        return row if row["status"] in ("succeeded", "failed") else None

    polled = wait_until(finished, 60, f"inference {handle['id']} to finish")
    assert polled["status"] == "succeeded" and polled["error"] is None
    direct = api.http.post("/v1/completions", json=body).json()
    assert polled["response"]["choices"][0]["text"] == direct["choices"][0]["text"]
    assert polled["response"]["object"] == "text_completion"


def test_many_callers_wait_their_whole_wait_and_then_get_their_answers(api: Api, stack: dict[str, Process]) -> None:
    """More callers than a connection pool's default wait together: each waits its own `Prefer: wait`, holding
    no thread, and none is cut short (redis' pool of 100 once answered the 101st with the handle at once)."""
    import asyncio
    import signal
    import time

    callers, wait_s = 150, 3.0
    headers = {"Authorization": api.http.headers["authorization"], "Prefer": f"wait={wait_s:g}"}
    body = {"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 2, "temperature": 0}

    async def call(client: httpx.AsyncClient) -> tuple[int, float, dict[str, Any]]:
        started = time.monotonic()
        response = await client.post("/v1/completions", json=body, headers=headers)
        return response.status_code, time.monotonic() - started, response.json()

    async def all_calls() -> list[tuple[int, float, dict[str, Any]]]:
        limits = httpx.Limits(max_connections=callers + 10)
        async with httpx.AsyncClient(base_url=str(api.http.base_url), timeout=60, limits=limits) as client:
            return await asyncio.gather(*(call(client) for _ in range(callers)))

    worker = stack["worker-inference"].popen.pid
    # The inference worker frozen: no answer can come, so every caller waits its whole wait.
    os.killpg(worker, signal.SIGSTOP)
    try:
        results = asyncio.run(all_calls())
    finally:
        os.killpg(worker, signal.SIGCONT)
    assert [status for status, _, _ in results] == [202] * callers
    assert min(waited for _, waited, _ in results) >= wait_s * 0.9
    # Once the worker runs again, every request is answered.
    def answered(inference_id: str) -> bool:
        return bool(api.http.get(f"/v1/inferences/{inference_id}").json()["status"] == "succeeded")

    for _, _, handle in results:
        wait_until(partial(answered, handle["id"]), 60, f"inference {handle['id']} to be answered")


def _finished_request(api: Api) -> str:
    """An online request, answered: its ID."""
    body = {"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 2, "temperature": 0}
    accepted = api.http.post("/v1/completions", json=body, headers={"Prefer": "wait=0"})
    assert accepted.status_code == 202, accepted.text
    inference_id: str = accepted.json()["id"]
    wait_until(lambda: api.http.get(f"/v1/inferences/{inference_id}").json()["status"] == "succeeded", 60,
               f"inference {inference_id} to succeed")
    return inference_id


def _set_row(inference_id: str, status: str, age: timedelta) -> None:
    from core.clock import utcnow
    from db.session import transaction

    with transaction() as session:
        session.execute(text("UPDATE inferences SET status = :status, created_at = :created, response = NULL, "
                             "finished_at = NULL WHERE id = :id"),
                        {"status": status, "created": utcnow() - age, "id": inference_id})


def test_the_reconciler_fails_requests_no_worker_answered(api: Api) -> None:
    from core.settings import get_settings
    from tasks.maintenance import reconcile

    # Two requests as a crashed worker leaves them (their messages are not redelivered): one older than
    # the abandon limit, one that may still be answered.
    lost, recent = _finished_request(api), _finished_request(api)
    limit = timedelta(seconds=get_settings().inference_abandon_seconds)
    _set_row(lost, "running", limit + timedelta(minutes=1))
    _set_row(recent, "queued", limit - timedelta(minutes=1))

    # The beat task's function, called directly so the test need not wait for beat; beat's own pass may get
    # there first, so the outcome is judged on the rows, which both passes write the same way.
    reconcile()

    polled = api.http.get(f"/v1/inferences/{lost}").json()
    assert polled["status"] == "failed" and polled["error"]["code"] == "inference_lost"
    assert polled["finished_at"] is not None and polled["response"] is None
    assert api.http.get(f"/v1/inferences/{recent}").json()["status"] == "queued"


def test_a_request_delivered_twice_is_claimed_once(api: Api) -> None:
    from tasks.inference import _claim_rows

    inference_id = _finished_request(api)
    _set_row(inference_id, "queued", timedelta(0))
    # Two copies in one claim statement, then a third later, as redelivery or a publish retry would send.
    first, second = _claim_rows([inference_id, inference_id], None)
    assert first is not None and second is None
    assert first.endpoint == "/v1/completions" and first.model_id == "tiny-gpt2" and first.servable()
    assert _claim_rows([inference_id], None) == [None]
    assert api.http.get(f"/v1/inferences/{inference_id}").json()["status"] == "running"


def test_one_message_of_several_requests_answers_each_its_own(api: Api) -> None:
    """The API sends concurrent requests as one message of IDs: each gets its own answer, row and reply."""
    from core import ids
    from core.clock import utcnow
    from db import inferences
    from db.session import relaxed_engine, transaction
    from domain import dispatch
    from domain.requests import CompletionRequest
    from infra import broker, replies

    with transaction() as session:
        tenant_id = session.execute(text("SELECT tenant_id FROM inferences WHERE id = :id"),
                                    {"id": _finished_request(api)}).scalar_one()
    asked = [("tiny-gpt2", "the food"), ("tiny-gpt2", "the service was"), ("tiny-gpt2", "a long day at"),
             ("no-such-model", "hello")]
    # The rows as the API writes them for these requests.
    bodies = [CompletionRequest(model=model, prompt=prompt, max_tokens=3, temperature=0) for model, prompt in asked]
    new = [inferences.NewRequest(ids.new_id(ids.INFERENCE), tenant_id, "/v1/completions", body.model,
                                 {"model": body.model, "prompt": [body.prompt], **body.sampling()}, utcnow())
           for body in bodies]
    with relaxed_engine().connect() as conn:
        inferences.create(conn, new)
    first = new[0].id
    # Its first request twice, as a publish retry would: answered once.
    assert broker.publish(dispatch.StagedTask(dispatch.TASK_INFER, ([r.id for r in new] + [first],)))

    pushed = [replies.wait_reply(r.id, 60) for r in new]
    assert all(reply is not None for reply in pushed), pushed
    for request, reply in zip(new[:3], pushed[:3], strict=True):
        assert reply is not None and reply["status"] == "succeeded", reply
        alone = _completion(api.http, {"prompt": request.request["prompt"][0], "max_tokens": 3, "temperature": 0})
        assert reply["response"]["id"] == f"cmpl-{request.id}"
        assert reply["response"]["choices"][0]["text"] == alone["choices"][0]["text"]
        polled = api.http.get(f"/v1/inferences/{request.id}").json()
        assert polled["status"] == "succeeded" and polled["response"]["choices"] == reply["response"]["choices"]
    missing = pushed[3]
    assert missing is not None and missing["status"] == "failed", missing
    assert missing["error"]["code"] == "model_not_found" and missing["error"]["status"] == 404
    assert api.http.get(f"/v1/inferences/{new[3].id}").json()["error"]["code"] == "model_not_found"
    # The duplicate was dropped in the same claim, so nothing more can be pushed for it.
    client = replies.client()
    assert client is not None and client.llen(replies._key(first)) == 0


# --- in-process: the batcher -----------------------------------------------------------------------------


class HeldRunner:
    """Doubles each input; the first call waits for `release`, so later requests queue behind it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[list[Any], Hashable]] = []

    def __call__(self, inputs: list[Any], group: Hashable) -> list[Any]:
        self.calls.append((list(inputs), group))
        if len(self.calls) == 1:
            self.release.wait(30)
        if any(x == "bad" for x in inputs):
            raise ValueError("bad input")
        return [x * 2 for x in inputs]


def test_batcher_groups_splits_and_isolates_failures() -> None:
    from domain.batching import BatcherRegistry

    runner = HeldRunner()
    registry = BatcherRegistry(window_s=0.0, max_size=5)
    results: dict[str, Any] = {}

    def call(name: str, inputs: list[Any], group: Hashable = None) -> None:
        try:
            results[name] = registry.call("k", runner, inputs, group)
        except ValueError as exc:
            results[name] = exc

    first = threading.Thread(target=call, args=("first", [0]))
    first.start()
    wait_until(lambda: runner.calls, 10, "the first batch to start")
    queued = [("a", [1, 2]), ("b", [3]), ("bad", ["bad"]), ("c", [4, 5]), ("other", [6], "g2"), ("d", [7])]
    threads = [threading.Thread(target=call, args=item) for item in queued]
    batcher = registry._batchers["k"]

    for queued_before, thread in enumerate(threads):
        thread.start()
        # One at a time, so the queue's order is the list's; all wait behind the held batch.
        wait_until(partial(lambda n: len(batcher._pending) == n, queued_before + 1), 10, "a request to queue")
    runner.release.set()
    for thread in [first, *threads]:
        thread.join(30)

    assert results["first"] == [0]
    assert results["a"] == [2, 4] and results["b"] == [6] and results["c"] == [8, 10] and results["d"] == [14]
    assert results["other"] == [12]
    assert isinstance(results["bad"], ValueError)
    # Oldest first, at most 5 inputs (c's two would make 6, and d may not jump ahead of c), one group;
    # the failure re-ran each of its requests alone; then c and d, then the other group.
    assert runner.calls[1:] == [([1, 2, 3, "bad"], None), ([1, 2], None), ([3], None), (["bad"], None),
                                ([4, 5, 7], None), ([6], "g2")]


def test_batcher_takes_tenants_in_turn_so_a_flood_does_not_starve_a_single_request() -> None:
    from domain.batching import BatcherRegistry

    runner = HeldRunner()
    registry = BatcherRegistry(window_s=0.0, max_size=4)
    futures = {"held": registry.submit("k", runner, ["held"], lane="flood")}
    wait_until(lambda: runner.calls, 10, "the first batch to start")
    batcher = registry._batchers["k"]
    # The flooding tenant queues six requests, then two more tenants one each, behind the held batch.
    arrivals = [(f"f{i}", "flood") for i in range(6)] + [("single", "light"), ("other", "third")]
    for name, lane in arrivals:
        futures[name] = registry.submit("k", runner, [name], lane=lane)
    assert len(batcher._pending) == len(arrivals)
    runner.release.set()
    assert {name: future.result(30) for name, future in futures.items()}["single"] == ["single" * 2]
    # Least recently served first (the flood had the held batch), then one request per tenant in turn;
    # within the flood, first come first served.
    assert [inputs for inputs, _ in runner.calls[1:]] == [["single", "other", "f0", "f1"], ["f2", "f3", "f4", "f5"]]


def test_batcher_waits_for_the_window_and_closes_when_idle() -> None:
    from domain.batching import Batcher

    calls: list[list[int]] = []

    def run(inputs: list[Any], group: Hashable) -> list[Any]:
        calls.append(list(inputs))
        return list(inputs)

    # A window longer than the test: the batch starts only because it is full.
    batcher = Batcher("window", run, window_s=60.0, max_size=3, idle_s=0.5)
    futures = [batcher.submit([i]) for i in range(3)]
    assert [f.result(10) for f in futures if f is not None] == [[0], [1], [2]]
    assert calls == [[0, 1, 2]]
    wait_until(lambda: batcher.closed, 10, "the idle batcher to close")
    assert batcher.submit([9]) is None


# --- in-process: the model cache ---------------------------------------------------------------------


def test_model_cache_evicts_least_recently_used_by_memory(services: dict[str, str]) -> None:
    from tasks import recipes
    from tasks.serving import ModelCache, model_bytes

    models = Path(services["home"]) / "models"
    bert, gpt2 = models / "tiny-bert", models / "tiny-gpt2"
    sizes = [model_bytes(recipes.predictor(task, path))
             for task, path in (("classification", bert), ("ner", bert), ("generation", gpt2))]
    assert all(size > 0 for size in sizes)

    # Room for any two of them, not for all three.
    cache = ModelCache(budget_bytes=sum(sizes) - 1)
    classifier = cache.get("tiny-bert", "classification", bert)
    tagger = cache.get("tiny-bert", "ner", bert)
    assert cache.get("tiny-bert", "classification", bert) is classifier  # a hit, and now most recent
    cache.get("tiny-gpt2", "generation", gpt2)
    assert cache.keys() == ["classification:tiny-bert", "generation:tiny-gpt2"]
    assert cache.used_bytes() <= cache.budget_bytes
    assert cache.get("tiny-bert", "ner", bert) is not tagger  # evicted, so loaded again
    assert cache.loads == 4

    # A model bigger than the whole budget still loads, alone.
    small = ModelCache(budget_bytes=1)
    small.get("tiny-bert", "classification", bert)
    predictor = small.get("tiny-gpt2", "generation", gpt2)
    assert small.keys() == ["generation:tiny-gpt2"]
    assert predictor.generate(["hi"], max_tokens=2, temperature=0)[0][0]["completion_tokens"] >= 1


def test_model_cache_loads_once_under_concurrent_first_requests(services: dict[str, str]) -> None:
    from tasks import recipes
    from tasks.serving import ModelCache

    models = Path(services["home"]) / "models"
    gpt2_loading = threading.Event()
    gpt2_may_finish = threading.Event()
    loaded: list[str] = []

    def load(task: str, path: Path) -> Any:
        if path.name == "tiny-gpt2":
            gpt2_loading.set()
            gpt2_may_finish.wait(30)
        predictor = recipes.predictor(task, path)
        loaded.append(f"{task}:{path.name}")
        return predictor

    cache = ModelCache(budget_bytes=1 << 30, load=load)
    slow = ThreadPoolExecutor(8)
    gpt2_callers = [slow.submit(cache.get, "tiny-gpt2", "generation", models / "tiny-gpt2") for _ in range(8)]
    wait_until(gpt2_loading.is_set, 10, "tiny-gpt2 to start loading")
    # Another model loads and answers while tiny-gpt2's load is held open.
    predictor = cache.get("tiny-bert", "classification", models / "tiny-bert")
    predictions = concurrently([lambda i=i: predictor.predict([f"text {i}", "more"]) for i in range(8)], 8)
    assert all(len(p) == 2 for p in predictions)
    assert loaded == ["classification:tiny-bert"]
    gpt2_may_finish.set()
    got = {id(f.result(60)) for f in gpt2_callers}
    slow.shutdown()
    assert len(got) == 1 and loaded.count("generation:tiny-gpt2") == 1 and cache.loads == 2


def test_predictors_answer_concurrent_callers(services: dict[str, str]) -> None:
    from tasks import recipes

    models = Path(services["home"]) / "models"
    classifier = recipes.predictor("classification", models / "tiny-bert")
    generator = recipes.predictor("generation", models / "tiny-gpt2")
    texts = [f"Mary Jones flew to Berlin on day {i} ." + " again" * i for i in range(16)]

    def answer(i: int) -> tuple[Any, Any]:
        # Seeded sampling reseeds the process's generator: unguarded, concurrent calls draw from each other's.
        return classifier.predict([texts[i]]), generator.generate([texts[i]], max_tokens=8, temperature=1.0, seed=i)

    expected = [answer(i) for i in range(16)]
    assert concurrently([lambda i=i: answer(i) for i in range(16)], 16) == expected
