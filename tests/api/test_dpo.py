"""Preference tuning (DPO) end to end on the real stack: OpenAI's line format and `method`, on tiny-gpt2."""

from __future__ import annotations

from typing import Any

from tests.conftest import Api
from tests.data import color_rows, jsonl, preference_rows


def dpo_method(**hyperparameters: Any) -> dict[str, Any]:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def _create(api: Api, rows: list[dict[str, Any]], **body: Any) -> Any:
    file_id = api.upload(jsonl(rows)).json()["id"]
    return api.http.post("/v1/fine_tuning/jobs", json={"training_file": file_id, "seed": 7, **body})


def test_dpo_job_trains_and_reports_rewards(api: Api) -> None:
    created = _create(api, preference_rows(3), model="tiny-gpt2",
                      method=dpo_method(beta=0.5, n_epochs=3, batch_size=4, learning_rate_multiplier=20))
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.5
    done = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert done["task"] == "generation" and done["method"]["type"] == "dpo"
    assert done["hyperparameters"]["beta"] == 0.5
    metrics = [e["data"] for e in api.events(job["id"]) if e["type"] == "metrics"]
    assert metrics and all({"train_loss", "rewards/accuracies", "rewards/margins"} <= set(m) for m in metrics)
    assert "eval_rewards/accuracies" in done["metrics"]
    # The model it made is a generation model like any other.
    answer = api.http.post("/v1/chat/completions", json={
        "model": done["fine_tuned_model"], "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "what color is the sky ?"}]})
    assert answer.status_code == 200, answer.text


def test_a_bad_dpo_line_fails_the_job_naming_it(api: Api) -> None:
    rows = preference_rows()
    rows[3] = {**rows[3], "preferred_output": {"role": "assistant", "content": "blue"}}
    job = _create(api, rows, model="tiny-gpt2", method=dpo_method()).json()
    final = api.wait_status(job["id"], {"failed", "succeeded"}, timeout=60)
    assert final["error"]["code"] == "invalid_training_file"
    assert 'line 4: "preferred_output" must be a list with one assistant message' in final["error"]["message"]


def test_method_and_file_must_agree(api: Api) -> None:
    # Preference pairs on a supervised job: the file is refused, naming what it holds and what to do.
    job = _create(api, preference_rows(), model="tiny-gpt2").json()
    final = api.wait_status(job["id"], {"failed", "succeeded"}, timeout=60)
    assert final["error"]["code"] == "invalid_training_file"
    assert "DPO preference pair" in final["error"]["message"] and '"dpo"' in final["error"]["message"]
    # Supervised rows on a DPO job: each line is named.
    job = _create(api, color_rows(1), model="tiny-gpt2", method=dpo_method()).json()
    final = api.wait_status(job["id"], {"failed", "succeeded"}, timeout=60)
    assert 'line 1: a DPO line needs "input"' in final["error"]["message"]
    # DPO on an encoder is a 400 at once.
    refused = _create(api, preference_rows(), model="tiny-bert", method=dpo_method())
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "unsupported_method"
    mismatched = _create(api, preference_rows(), model="tiny-gpt2",
                         method={"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}})
    assert mismatched.status_code == 400, mismatched.text
