"""NER and generation beside classification: train through the API, serve through the API and the openai SDK."""

from __future__ import annotations

from typing import Any

from openai import OpenAI

from tests.conftest import Api
from tests.data import COLORS, color_rows, jsonl, ner_rows, sentiment_rows, to_bioes


def conll(rows: list[dict[str, Any]]) -> str:
    """CoNLL columns (token POS tag), a -DOCSTART- line, blank lines between sentences."""
    lines = ["-DOCSTART- -X- O", ""]
    for row in rows:
        lines += [f"{token} X {tag}" for token, tag in zip(row["tokens"], row["tags"], strict=True)] + [""]
    return "\n".join(lines) + "\n"


def _train(api: Api, content: str, **body: Any) -> dict[str, Any]:
    file_id = api.upload(content).json()["id"]
    # A fixed seed keeps these tiny random-init models' outcomes the same on every run.
    created = api.http.post("/v1/fine_tuning/jobs", json={"training_file": file_id, "seed": 7, **body})
    assert created.status_code == 200, created.text
    done = api.wait_status(created.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    return done


def test_ner_from_a_conll_file_trains_and_finds_entities_with_offsets(api: Api) -> None:
    rows = [{**row, "tags": to_bioes(row["tags"])} for row in ner_rows(120, seed=1)]
    done = _train(api, conll(rows), model="tiny-bert",
                  hyperparameters={"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3})
    assert done["task"] == "ner"  # inferred from the file, BIOES tags normalised
    metrics = done["metrics"]
    assert metrics["f1"] >= 0.8, metrics
    assert set(metrics["per_type"]) == {"PER", "LOC"}
    assert {"precision", "recall", "f1", "support"} <= set(metrics["per_type"]["PER"])

    text = "Mary Jones flew to Berlin yesterday ."
    answer = api.http.post("/v1/ner", json={"model": done["fine_tuned_model"], "input": text})
    assert answer.status_code == 200, answer.text
    entities = answer.json()["data"][0]["entities"]
    assert {(e["entity_group"], e["text"]) for e in entities} >= {("PER", "Mary Jones"), ("LOC", "Berlin")}
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)


def test_bad_ner_file_names_the_line(api: Api) -> None:
    bad = [{"tokens": ["Anna", "lives", "here"], "tags": ["B-PER", "O"]}, *ner_rows(4, seed=2)]
    file_id = api.upload(jsonl(bad)).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id}).json()
    final = api.wait_status(job["id"], {"failed", "succeeded"}, timeout=60)
    assert final["error"]["code"] == "invalid_training_file"
    assert 'line 1: "tags" has 2 items, "tokens" has 3' in final["error"]["message"]


def test_generation_data_on_an_encoder_fails_clearly(api: Api) -> None:
    file_id = api.upload(jsonl(color_rows(2))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id}).json()
    final = api.wait_status(job["id"], {"failed", "succeeded"}, timeout=60)
    assert final["status"] == "failed"
    assert "generation data" in final["error"]["message"] and "classification" in final["error"]["message"]


def test_generation_trains_and_answers_through_the_openai_sdk(api: Api, api_url: str) -> None:
    done = _train(api, jsonl(color_rows(6)), model="tiny-gpt2", suffix="colors",
                  hyperparameters={"n_epochs": 30, "batch_size": 8, "learning_rate": 3e-3})
    assert done["task"] == "generation"
    metrics = done["metrics"]
    assert metrics["perplexity"] < metrics["perplexity_before"], metrics

    client = OpenAI(base_url=f"{api_url}/v1", api_key=api.http.headers["authorization"].split()[-1])
    completion = client.completions.create(model=done["fine_tuned_model"], prompt="what color is the sky ?",
                                           max_tokens=6, temperature=0, stop=["."])
    assert completion.choices[0].text.strip() == f"the sky is {COLORS['sky']}"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    several = client.completions.create(model="tiny-gpt2", prompt=["hello", "the"], max_tokens=4, n=2, seed=7)
    assert len(several.choices) == 4 and [c.index for c in several.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("length", "stop") for c in several.choices)

    chat = client.chat.completions.create(model="tiny-gpt2", max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "say something"}])
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens <= 5

    # Streaming is offered (tests/api/test_streaming.py); its options are checked like any field.
    refused = api.http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "stream": True,
                                                     "stream_options": {"include_usage": True, "chunk_size": 4}})
    assert refused.status_code == 400 and "stream_options" in refused.json()["error"]["param"], refused.text
    wrong = api.http.post("/v1/completions", json={"model": "tiny-bert", "prompt": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "unsupported_task"


def test_lora_and_continued_training_from_an_own_model(api: Api) -> None:
    lora = _train(api, jsonl(ner_rows(80, seed=3)), model="tiny-bert",
                  hyperparameters={"n_epochs": 6, "batch_size": 8, "learning_rate": 2e-2, "lora": True})
    assert lora["hyperparameters"]["lora"]["r"] > 0
    served = api.http.post("/v1/ner", json={"model": lora["fine_tuned_model"], "input": ["Tom lives in Rome ."]})
    assert served.status_code == 200, served.text

    # 120 rows and 4 epochs, as the lifecycle test trains it: the random-init model learns under any batch order.
    first = _train(api, jsonl(sentiment_rows(120)), model="tiny-bert", suffix="v1",
                   hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate": 3e-3})
    second = _train(api, jsonl(sentiment_rows(80, seed=5)), model=first["fine_tuned_model"], suffix="v2",
                    hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3})
    assert second["fine_tuned_model"] == f"ft:tiny-bert:acme:v2:{second['id']}"
    assert second["model"] == first["fine_tuned_model"]
    model = api.http.get(f"/v1/models/{second['fine_tuned_model']}").json()
    assert model["base_model"] == "tiny-bert" and model["tasks"] == ["classification", "embeddings"]
    answer = api.http.post("/v1/classifications", json={"model": second["fine_tuned_model"],
                                                         "input": "the food was superb"}).json()
    assert answer["data"][0]["label"] == "pos"


def test_model_download_is_a_loadable_tar(api: Api, tmp_path: Any) -> None:
    import io
    import tarfile

    from training.predict import ClassificationPredictor

    done = _train(api, jsonl(sentiment_rows(120)), model="tiny-bert",
                  hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate": 3e-3})
    response = api.http.get(f"/v1/models/{done['fine_tuned_model']}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    # Written out as it is read (chunked), never built whole on the server's disk first.
    assert response.headers.get("transfer-encoding") == "chunked" and "content-length" not in response.headers
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path, filter="data")
    (model_dir,) = list(tmp_path.iterdir())
    assert (model_dir / "config.json").exists()
    predicted = ClassificationPredictor(model_dir).predict(["the room was lovely"])
    assert predicted[0]["label"] == "pos"
    assert api.http.get("/v1/models/tiny-bert/content").status_code == 403
