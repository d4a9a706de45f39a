"""Training files built to break the reader fail their job with `invalid_training_file`, once."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from tests.conftest import Api


def test_a_deeply_nested_line_fails_the_job_naming_the_line(api: Api) -> None:
    content = '{"text": "fine", "label": "a"}\n' + "[" * 200_000 + "\n"
    file_id = api.upload(content).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id}).json()
    done = api.wait_status(job["id"], {"failed", "queued", "running", "succeeded"}, timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "invalid_training_file"
    assert "line 2: nested too deeply" in done["error"]["message"]


def test_a_line_of_many_megabytes_is_refused_without_holding_it(tmp_path: Path) -> None:
    from training.data import MAX_LINE_BYTES, DataError, looks_like_conll, read_jsonl

    path = tmp_path / "huge.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"text": "ok", "label": "a"}\n{"text": "')
        for _ in range(MAX_LINE_BYTES // (1024 * 1024) + 2):
            handle.write(b"x" * 1024 * 1024)
        handle.write(b'", "label": "b"}\n{"text": "fine", "label": "b"}\n')
    assert not looks_like_conll(path)
    with pytest.raises(DataError) as raised:
        read_jsonl(path)
    assert raised.value.problems == ["line 2: longer than 8 MiB"]


def test_validation_that_never_finishes_is_not_retried_forever(api: Api) -> None:
    from core.clock import utcnow
    from core.settings import get_settings
    from db.models import FineTuningJob
    from db.session import transaction

    file_id = api.upload('{"text": "a", "label": "x"}\n').json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id}).json()
    api.wait_status(job["id"], {"failed", "queued"}, timeout=60)
    # As if every validation so far had died with its worker: still validating, long untouched, and the
    # reconciler has sent it again as often as it may.
    with transaction() as session:
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job["id"]).values(
            status="validating_files", validation_attempts=get_settings().max_attempts,
            updated_at=utcnow() - timedelta(hours=1)))
    done = api.wait_status(job["id"], {"failed", "queued"}, timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_training_file"
    assert "stopped without finishing" in done["error"]["message"]
