"""A job's `integrations`: the experiment trackers its training reports to (MLflow), checked at creation."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.errors import ServiceError
from core.settings import get_settings
from domain import webhooks


def check_integrations(integrations: list[dict[str, Any]]) -> None:
    """Refuse, naming the field, what the workers could not log to.

    Resolves tracking servers' hosts (the webhook address rule: no private addresses unless allowed), so it
    blocks: an asyncio caller runs it on a thread.
    """
    for index, entry in enumerate(integrations):
        param = f"integrations[{index}].mlflow"
        if importlib.util.find_spec("mlflow") is None:
            raise ServiceError(400, f"{param}: this server has no MLflow client; its operator can install it "
                               "(pip install mlflow-skinny)", param=param, code="integration_unavailable")
        _check_tracking_uri(str(entry["mlflow"]["tracking_uri"]), f"{param}.tracking_uri")


def _check_tracking_uri(uri: str, param: str) -> None:
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            webhooks.resolve_safe(uri)
        except webhooks.UnsafeURL as exc:
            message = str(exc).replace("webhook URLs", "tracking URIs")
            raise ServiceError(400, f"{param}: {message}", param=param, code="invalid_integration") from None
        return
    if scheme == "sqlite":
        root = get_settings().mlflow_local_root
        if root is None:
            raise ServiceError(400, f"{param}: local tracking stores are off on this server (its operator sets "
                               "LLMOS_MLFLOW_LOCAL_ROOT); use an MLflow tracking server's http(s) URI",
                               param=param, code="invalid_integration")
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path.startswith("/") or not Path(path).resolve().is_relative_to(Path(root).resolve()):
            raise ServiceError(400, f"{param}: a sqlite tracking store must be an absolute path under {root} "
                               f"(sqlite:///{Path(root).resolve()}/NAME.db)", param=param, code="invalid_integration")
        return
    raise ServiceError(400, f"{param}: must be an http(s) URI of an MLflow tracking server (or sqlite:///… under "
                       "the server's LLMOS_MLFLOW_LOCAL_ROOT)", param=param, code="invalid_integration")
