"""What a job's error tells a client: what went wrong, never where on the server."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.conftest import Api
from tests.data import jsonl, sentiment_rows


def test_a_training_failure_names_no_server_path(api: Api) -> None:
    from core.settings import get_settings
    from db.models import Model
    from db.session import transaction

    # A registered base model whose weights have gone missing from disk: loading it names the directory.
    broken = Path(tempfile.mkdtemp(prefix="llmos-broken-model-"))
    try:
        source = get_settings().models_dir / "tiny-bert"
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (source / name).exists():
                shutil.copy(source / name, broken / name)
        with transaction() as session:
            session.add(Model(id="broken-bert", owned_by="system", kind="base", tasks=["classification"],
                              architecture="bert", path=str(broken)))
        file_id = api.upload(jsonl(sentiment_rows(20))).json()["id"]
        job = api.http.post("/v1/fine_tuning/jobs", json={"model": "broken-bert", "training_file": file_id}).json()
        done = api.wait_status(job["id"], {"failed", "succeeded"}, timeout=120)
    finally:
        shutil.rmtree(broken, ignore_errors=True)
    assert done["status"] == "failed" and done["error"]["code"] == "training_error"
    message = done["error"]["message"]
    assert str(broken) not in message and "/tmp" not in message and "<path>" in message, message
    events = " ".join(api.messages(job["id"]))
    assert str(broken) not in events and "Training started (attempt 1)" in events
