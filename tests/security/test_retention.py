"""What the service keeps: old inference traffic and events are purged; a deleted file's bytes are gone."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tests.conftest import Api
from tests.data import jsonl, sentiment_rows


def test_deleting_a_result_file_removes_its_bytes(api: Api) -> None:
    from db.models import File
    from db.session import transaction

    file_id = api.upload(jsonl(sentiment_rows(40))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                      "hyperparameters": {"n_epochs": 1}}).json()
    done = api.wait_status(job["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    (result_id,) = done["result_files"]
    with transaction() as session:
        stored = Path(session.get(File, result_id).path)  # type: ignore[union-attr]
    assert stored.exists()
    assert api.http.delete(f"/v1/files/{result_id}").status_code == 200
    assert not stored.exists()


def test_beat_purges_what_is_older_than_the_retention(api: Api) -> None:
    from core.clock import utcnow
    from core.settings import get_settings
    from db.models import DeliveryAttempt, Inference, OutboxEvent, Tenant, WebhookDelivery
    from db.session import transaction
    from tasks.maintenance import purge

    api.http.get("/v1/limits")  # the tenant exists
    old = utcnow() - timedelta(days=get_settings().retention_days + 1)
    with transaction() as session:
        tenant_id = session.scalars(select(Tenant.id)).one()

        def event(event_id: str, created: Any) -> None:
            session.add(OutboxEvent(id=event_id, tenant_id=tenant_id, type="test", data={}, created_at=created,
                                    dispatched_at=created))

        event("evt_old", old)
        event("evt_old_pending", old)
        event("evt_new", utcnow())
        session.flush()
        for event_id, status in (("evt_old", "succeeded"), ("evt_old_pending", "pending")):
            delivery = WebhookDelivery(event_id=event_id, event_seq=1, tenant_id=tenant_id, destination="d",
                                       url="http://x/", status=status, attempts=1, created_at=old, updated_at=old)
            session.add(delivery)
            session.flush()
            session.add(DeliveryAttempt(delivery_id=delivery.id, event_id=event_id, url="http://x/", attempt=1,
                                        status_code=200, duration_ms=1, created_at=old))
        for inference_id, finished in (("inf_old", old), ("inf_new", utcnow()), ("inf_running", None)):
            session.add(Inference(id=inference_id, tenant_id=tenant_id, endpoint="/v1/completions", model="m",
                                  status="succeeded" if finished else "running", request={"prompt": ["secret"]},
                                  created_at=old, finished_at=finished))

    counts = purge()
    assert counts == {"checkpoints": 0, "inferences": 1, "events": 1}
    with transaction() as session:
        assert set(session.scalars(select(OutboxEvent.id).where(OutboxEvent.type == "test"))) == {
            "evt_old_pending", "evt_new"}
        assert set(session.scalars(select(Inference.id))) == {"inf_new", "inf_running"}
        # The purged event's delivery and its attempts went with it; the pending one's stay.
        assert session.scalar(select(func.count()).select_from(DeliveryAttempt)) == 1
