"""One typed settings object, read once from ``LLMOS_*`` environment variables."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.secret_files import generated_secret

PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "admin", "password", "secret"}
# Shortest secret `LLMOS_ENV=production` accepts.
MIN_SECRET_LENGTH = 16
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Settings(BaseSettings):
    """Every knob of the service. The README's settings table documents each field."""

    model_config = SettingsConfigDict(env_prefix="LLMOS_", extra="ignore")

    env: Literal["development", "production"] = Field(
        "development", description="`production` refuses placeholder secrets at start-up."
    )
    home: Path = Field(Path.home() / ".llmos", description="Files, models, artifacts and embedded servers.")
    database_url: str | None = Field(
        None, description="Postgres URL; unset means the embedded Postgres that `llmos up` runs in HOME."
    )
    broker_url: str | None = Field(
        None, description="Redis (or AMQP) URL; unset means the embedded Redis that `llmos up` runs in HOME."
    )
    api_host: str = Field("127.0.0.1", description="Address the API (and Flower) bind to.")
    tls_certfile: Path | None = Field(
        None, description="PEM certificate chain: with the key, the API and Flower serve HTTPS only, with HSTS."
    )
    tls_keyfile: Path | None = Field(None, description="PEM private key of `LLMOS_TLS_CERTFILE`.")
    behind_tls_proxy: bool = Field(
        False, description="1 declares that a reverse proxy terminates TLS in front of the API and Flower, so "
                           "`production` accepts a non-loopback `LLMOS_API_HOST` without a certificate here."
    )
    api_port: int = Field(8000, description="API port.")
    flower_port: int = Field(5555, description="Flower port.")
    flower_user: str = Field("admin", description="Flower basic-auth user.")
    flower_password: str | None = Field(
        None, description="Flower basic-auth password; generated and kept in HOME when unset (development)."
    )
    api_workers: int = Field(
        0, description="API processes behind the port (`llmos api --workers N`); 0 means one per CPU core, at most 4."
    )
    secret_key: str | None = Field(
        None, description="Keys sealing webhook secrets at rest, comma-separated, the first sealing (rotation: "
                          "README). Unset in development: generated into HOME/run/secret_key."
    )
    metrics_token: str | None = Field(
        None, description="When set, `/metrics` and the API docs (`/docs`, `/redoc`, `/openapi.json`) answer only "
                          "requests with `Authorization: Bearer <token>`."
    )
    auth_cache_seconds: float = Field(
        5.0, description="How long an API process trusts a key lookup: a revoked key stops working within this."
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Upload size cap (413 above it).")
    torch_threads: int = Field(
        1, description="torch threads per worker process on CPU (two processes sharing cores ran ~4x slower at 2)."
    )
    train_concurrency: int = Field(1, description="Training processes per `gpu` worker (one per GPU).")
    worker_processes: int | None = Field(
        None, ge=1, le=64,
        description="Data-parallel ranks one training task of this worker may run, the most `compute.processes` "
                    "it accepts. Unset: its GPUs divided among `train_concurrency` tasks, or 1 on CPU.")
    task_time_limit: int = Field(
        6 * 3600, description="Hard time limit of one training task, seconds; kept below the visibility timeout."
    )
    broker_visibility_timeout: int = Field(
        12 * 3600, description="Redis visibility timeout, seconds; must exceed the task time limit."
    )
    heartbeat_seconds: float = Field(5.0, description="How often a running job heartbeats and reads its flags.")
    # The heartbeat runs on its own thread, so a long step or evaluation never silences it: a crashed
    # worker's job is back in the queue within stale + reconcile seconds (the target is under a minute).
    stale_heartbeat_seconds: float = Field(
        30.0, description="A running job silent this long is requeued by the reconciler."
    )
    reconcile_seconds: float = Field(10.0, description="Reconciler period (beat).")
    requeue_after_seconds: float = Field(
        60.0, description="A queued job untouched this long has its task sent again."
    )
    max_attempts: int = Field(
        3, description="Times a job's worker may be lost before the job fails (pauses and hand-backs do not count)."
    )
    max_job_runtime_seconds: int = Field(
        24 * 3600, description="Default maximum training time of a job (hyperparameter `max_runtime_seconds`)."
    )
    convert_gguf_models: bool = Field(
        True, description="Convert packaged GGUF models (smollm2) to plain model dirs on first start (~1 min once)."
    )
    eval_fraction: float = Field(0.1, description="Share of training rows held out when no validation file.")
    progress_event_seconds: float = Field(10.0, description="Throttle of progress events (plus each epoch end).")
    inference_wait_seconds: float = Field(60.0, description="Default `Prefer: wait=N` of online inference.")
    inference_abandon_seconds: float = Field(
        900.0, description="An online request unanswered this long fails with `inference_lost` (its worker "
                           "stopped: requests are not redelivered)."
    )
    inference_concurrency: int = Field(
        64, description="Requests one inference worker process holds at once (threads), so they can be batched."
    )
    inference_batch_window_ms: float = Field(
        5.0, description="How long the first request of a batch waits for others for the same model, ms."
    )
    inference_max_batch_size: int = Field(32, description="Most requests grouped into one forward pass.")
    model_cache_mb: int = Field(
        4096, description="Memory budget of the warm models in one inference worker, MiB (LRU eviction above it)."
    )
    batch_chunk_lines: int = Field(
        500, description="Lines of a batch file run as one task; a crash redoes at most one chunk."
    )
    mlflow_local_root: Path | None = Field(
        None, description="Directory under which a job's `mlflow` integration may name a `sqlite:///` tracking "
                          "store (one the workers share, with its artifacts beside it); unset: only http(s) "
                          "tracking servers.")
    checkpoint_retention_days: float = Field(
        30.0, ge=0, description="A finished job's checkpoints (`ft:…:ckpt-step-N` models) are deleted this long "
                                "after it finished, by beat, hourly, whether or not its model was deleted; "
                                "0 keeps them forever."
    )
    retention_days: float = Field(
        30.0, ge=0, description="Answered inference requests (inputs and outputs), events and webhook delivery "
                                "attempts older than this are deleted by beat, hourly; 0 keeps them forever."
    )
    default_classification_model: str = Field("tiny-bert", description="Model of the seed routes for labels.")
    default_generation_model: str = Field("tiny-gpt2", description="Model of the seed routes for text.")
    webhook_allow_private: bool = Field(False, description="1 lets webhooks reach loopback/private addresses.")
    webhook_timeout_seconds: float = Field(10.0, description="A webhook attempt slower than this fails.")
    webhook_dispatch_seconds: float = Field(1.0, description="How often beat sends webhook retries that are due.")
    webhook_concurrency: int = Field(
        8, ge=1, description="Destinations one webhooks worker sends to at once (threads; each holds a database "
                             "connection while it sends)."
    )
    webhook_retry_schedule: str = Field(
        "5,300,1800,7200,18000,36000,36000,36000,36000,36000,36000",
        description="Seconds between webhook attempts, comma-separated.",
    )

    # Sharing one service: limits of a tenant whose own value is unset (`llmos tenants set`); 0 is unlimited.
    default_rpm: int = Field(6000, ge=0, description="Requests per minute per tenant, every authenticated route.")
    default_tpm: int = Field(
        2_000_000, ge=0, description="Tokens per minute per tenant on the inference routes (prompt + completion)."
    )
    default_max_active_jobs: int = Field(100, ge=0, description="Unfinished fine-tuning jobs per tenant.")
    default_max_storage_bytes: int = Field(
        100 * 1024**3, ge=0, description="Bytes of stored files per tenant (uploads and results)."
    )
    default_max_webhook_endpoints: int = Field(20, ge=0, description="Webhook endpoints per tenant.")
    default_max_active_batches: int = Field(50, ge=0, description="Unfinished batches per tenant.")
    scheduler: Literal["fair", "fifo"] = Field(
        "fair", description="Training admission and file validation: `fair` between tenants (weights, priorities) "
                    "or plain `fifo`."
    )
    rate_limit_redis_url: str | None = Field(
        None, description="Redis holding the rate-limit counters; unset means the broker's, when it is a Redis."
    )
    max_request_tokens: int = Field(
        32_768, ge=1, description="Most tokens one completion or chat request may ask for (prompts x n x max_tokens)."
    )
    generation_max_seconds: float = Field(
        60.0, gt=0, description="Wall-clock limit of one generation call on an inference worker; past it the "
                                "answers end with finish_reason `length`."
    )
    inference_max_wait_seconds: float = Field(
        120.0, gt=0, description="Cap on `Prefer: wait=N`: past it a request answers 202 and is polled."
    )
    response_cache_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Bytes of deterministic inference answers kept in Redis per tenant "
                                            "(least recently used evicted first); 0 turns the response cache off."
    )
    response_cache_seconds: float = Field(
        3600.0, gt=0, description="How long a cached inference answer lives after its last use, seconds."
    )
    storage_url: str | None = Field(
        None, description="`s3://BUCKET/PREFIX` keeps uploaded files, batch files, checkpoints and fine-tuned models "
                          "in S3-compatible object storage (credentials from the standard `AWS_*` variables); "
                          "unset keeps them under HOME."
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of a non-AWS object store (MinIO, Ceph), e.g. `http://minio:9000`; unset means AWS."
    )
    storage_cache_mb: int = Field(
        10240, ge=1, description="Disk budget of the objects (files, models) a machine keeps downloaded from "
                                 "`LLMOS_STORAGE_URL`, MiB, shared by the processes of one HOME (least recently "
                                 "used evicted first)."
    )
    cpu_int8: bool = Field(
        False, description="1 serves classifiers, NER taggers and generation models on CPU with dynamic int8 "
                           "Linear layers (faster, slightly different answers); embeddings and zero-shot labels "
                           "stay float32; never on CUDA."
    )

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("LLMOS_TLS_CERTFILE and LLMOS_TLS_KEYFILE are set together, or neither")
        if self.env == "production":
            password = self.flower_password or ""
            if password in PLACEHOLDER_SECRETS or len(password) < MIN_SECRET_LENGTH:
                raise ValueError(f"LLMOS_FLOWER_PASSWORD must be a real secret of at least {MIN_SECRET_LENGTH} "
                                 "characters when LLMOS_ENV=production")
            if not self.secret_key or any(len(k.strip()) < MIN_SECRET_LENGTH for k in self.secret_key.split(",")):
                raise ValueError(f"LLMOS_SECRET_KEY must be set, each key at least {MIN_SECRET_LENGTH} characters, "
                                 "when LLMOS_ENV=production")
            if self.metrics_token is not None and len(self.metrics_token) < MIN_SECRET_LENGTH:
                raise ValueError(f"LLMOS_METRICS_TOKEN must be at least {MIN_SECRET_LENGTH} characters when "
                                 "LLMOS_ENV=production")
            if self.webhook_allow_private:
                raise ValueError("LLMOS_WEBHOOK_ALLOW_PRIVATE=1 lets any tenant reach your private network; it is "
                                 "refused when LLMOS_ENV=production")
            if self.api_host not in LOOPBACK_HOSTS and not (self.tls_enabled or self.behind_tls_proxy):
                raise ValueError(f"LLMOS_API_HOST={self.api_host} without TLS would send keys in clear text: set "
                                 "LLMOS_TLS_CERTFILE and LLMOS_TLS_KEYFILE, or put a TLS-terminating reverse proxy "
                                 "in front and set LLMOS_BEHIND_TLS_PROXY=1 (LLMOS_ENV=production)")
        if self.storage_url is not None and not self.storage_url.startswith("s3://"):
            raise ValueError(f"LLMOS_STORAGE_URL={self.storage_url!r} is not an s3://BUCKET/PREFIX URL; leave it "
                             "unset to keep files under LLMOS_HOME")
        if self.broker_visibility_timeout <= self.task_time_limit:
            raise ValueError("LLMOS_BROKER_VISIBILITY_TIMEOUT must exceed LLMOS_TASK_TIME_LIMIT")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certfile is not None and self.tls_keyfile is not None

    # Derived locations: one layout under HOME for every process.
    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def storage_cache_dir(self) -> Path:
        return self.home / "cache" / "storage"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def embedded_state_file(self) -> Path:
        return self.run_dir / "embedded.json"

    def resolved_database_url(self) -> str:
        """The configured URL, else the embedded server `llmos up` started in HOME."""
        return self.database_url or self._embedded("database_url")

    def resolved_broker_url(self) -> str:
        return self.broker_url or self._embedded("broker_url")

    def resolved_flower_password(self) -> str:
        return self.flower_password or self._generated("flower_password", 18)

    def resolved_secret_key(self) -> str:
        return self.secret_key or self._generated("secret_key", 32)

    def _generated(self, name: str, nbytes: int) -> str:
        """A random secret kept in ``run/<name>`` (mode 0600), made by whichever process asks first."""
        return generated_secret(self.run_dir / name, nbytes)

    def _embedded(self, key: str) -> str:
        try:
            state = json.loads(self.embedded_state_file.read_text())
        except FileNotFoundError:
            raise RuntimeError(
                f"LLMOS_{key.upper()} is not set and no embedded servers run under {self.home}: "
                "start them with `llmos up`, or set the URL"
            ) from None
        return str(state[key])


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
