"""The `llmos` command line: run the system, manage keys and models, and act as a client."""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import logging
import os
import shutil
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.settings import get_settings

log = logging.getLogger("llmos")
SCOPES = ("files", "fine_tuning", "batches", "inference", "webhooks", "admin")
DEFAULT_SCOPES = [s for s in SCOPES if s != "admin"]

# Queue → (concurrency, extra worker options). Training: one process per GPU, a fresh process per
# task so CUDA memory is returned; inference: its own process so requests never wait behind training,
# with a threads pool of `inference_concurrency` (concurrency 0 here) so concurrent requests are in one
# process together and can be batched; prefetch (concurrency times worker_prefetch_multiplier 1) holds
# that many, acknowledged on receipt as every queue's.
QUEUE_PROFILES: dict[str, tuple[int, list[str]]] = {
    "gpu": (1, ["--max-tasks-per-child=1"]),
    "inference": (0, ["--pool=threads"]),
    "cpu": (2, []),
    # Senders wait on receivers, not the CPU: threads, `webhook_concurrency` of them.
    "webhooks": (0, ["--pool=threads"]),
}


# Commands that talk to the API over HTTP rather than run part of the system.
CLIENT_COMMANDS = ("files", "jobs", "events")


def _setup_logging(default_level: str) -> None:
    logging.basicConfig(level=os.environ.get("LLMOS_LOG_LEVEL", default_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _parse_scopes(values: list[str] | None) -> list[str]:
    if not values:
        return list(DEFAULT_SCOPES)
    scopes = sorted({s.strip() for v in values for s in v.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise SystemExit(f"error: unknown scope(s) {', '.join(unknown)}; choose from {', '.join(SCOPES)}")
    return scopes


def check_storage() -> None:
    """With LLMOS_STORAGE_URL set, open the bucket now: a missing bucket or refused credentials stop start-up
    with the setting named, instead of failing the first upload or job."""
    from domain import storage
    from infra import objectstore  # noqa: F401  (installs the boto3 adapter)

    try:
        storage.check_object_store()
    except storage.StorageError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_migrate(_: argparse.Namespace) -> None:
    from ops.bootstrap import migrate, register_base_models

    check_storage()
    migrate()
    names = register_base_models(get_settings().models_dir)
    print(f"database at head; base models: {', '.join(names)}")


# Without a count, one API process per core up to this many: each holds up to `db.aio.CONNECTIONS` Postgres
# connections, and Postgres allows 100 by default, shared with every worker.
DEFAULT_MAX_API_WORKERS = 4


def api_workers(requested: int | None) -> int:
    """API processes: as asked, else the setting, else one per CPU core this process may use (at most 4)."""
    chosen = requested or get_settings().api_workers
    return chosen if chosen > 0 else min(len(os.sched_getaffinity(0)), DEFAULT_MAX_API_WORKERS)


def cmd_api(args: argparse.Namespace) -> None:
    import uvicorn

    settings = get_settings()
    check_storage()
    workers = api_workers(args.workers)
    metrics_dir: Path | None = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each process counts its own requests; /metrics, answered by any one of them, must sum them all.
        metrics_dir = settings.run_dir / f"api-metrics-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        # uvloop and httptools: the event loop and HTTP parser in C, a large share of a simple request's CPU.
        # With a certificate, HTTPS only: the port speaks nothing else.
        uvicorn.run("api.app:create_app", factory=True, host=settings.api_host, port=settings.api_port,
                    workers=workers, loop="uvloop", http="httptools", log_level="warning",
                    timeout_graceful_shutdown=10,
                    ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
                    ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_argv(queues: list[str], name: str) -> list[str]:
    """Celery worker arguments for a worker serving `queues`, by their profiles."""
    settings = get_settings()
    threaded = queues in (["inference"], ["webhooks"])
    # Beside other queues, inference shares their prefork pool (one request at a time per process).
    profiles = [QUEUE_PROFILES.get(q, (1, [])) for q in queues if threaded or q != "inference"] or [(1, [])]
    if queues == ["webhooks"]:
        concurrency = settings.webhook_concurrency
    elif threaded:
        concurrency = settings.inference_concurrency
    else:
        concurrency = max(c for c, _ in profiles)
    extra = [opt for _, options in profiles for opt in options]
    consumed = list(queues)
    if "gpu" in queues:
        from domain.dispatch import training_queues
        from tasks.capacity import worker_capacity

        concurrency = settings.train_concurrency
        # The tickets of jobs as wide as this worker can run wait on `gpu.p2` … `gpu.pN` beside `gpu`.
        consumed[queues.index("gpu"):queues.index("gpu") + 1] = training_queues(worker_capacity())
    return ["worker", "-Q", ",".join(consumed), "-c", str(max(1, concurrency)), "-n",
            f"{name}-{os.getpid()}@{socket.gethostname()}", "--loglevel=INFO", "--without-mingle",
            "--without-gossip", *sorted(set(extra))]


def cmd_worker(args: argparse.Namespace) -> None:
    from tasks.app import celery_app, serve_only_inference

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUE_PROFILES]
    if unknown:
        raise SystemExit(f"error: unknown queue(s) {', '.join(unknown)}; choose from {', '.join(QUEUE_PROFILES)}")
    os.environ["LLMOS_WORKER_QUEUES"] = ",".join(queues)
    check_storage()
    if queues == ["inference"]:
        # Its models run in a model process of its own, which imports the training code itself.
        serve_only_inference()
    elif queues:
        # Import torch and transformers once, before the pool forks: each training task gets a fresh
        # process (--max-tasks-per-child=1), and validation resolves hyperparameters with the training
        # code; both would otherwise pay seconds of imports. Importing does not initialise CUDA; that
        # happens only in the child that trains.
        import training.classification
        import training.predict  # noqa: F401

        # Celery collects garbage before each fork of a pool process; over torch's and transformers' objects
        # that took about 0.2 s of every replacement. Frozen, they are skipped (and pages they sit on are
        # not copied by the collector touching them in the children).
        gc.freeze()
    celery_app.worker_main(worker_argv(queues, "-".join(queues)))


def cmd_beat(_: argparse.Namespace) -> None:
    from tasks.app import celery_app

    run_dir = get_settings().run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "-s", str(run_dir / "celerybeat-schedule"), "--loglevel=INFO"])


def cmd_flower(_: argparse.Namespace) -> None:
    from tasks.app import celery_app

    settings = get_settings()
    # From the environment, not the command line: arguments are readable by every user of the host (`ps`).
    os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{settings.resolved_flower_password()}"
    tls = ([f"--certfile={settings.tls_certfile}", f"--keyfile={settings.tls_keyfile}"]
           if settings.tls_enabled else [])
    celery_app.start(["flower", f"--port={settings.flower_port}", f"--address={settings.api_host}",
                      "--persistent=False", *tls])


def actor() -> str:
    """Who runs an administrative command, for the audit log."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid {os.getuid()}"


_DURATION = {"m": 60, "h": 3600, "d": 86400}


def _expiry(text: str | None) -> datetime | None:
    """``--expires-in 90d`` (or ``12h``, ``30m``) as the moment the key stops working."""
    if text is None:
        return None
    amount, unit = text[:-1], text[-1:]
    if unit not in _DURATION or not amount.isdigit() or int(amount) < 1:
        raise SystemExit(f"error: --expires-in takes a whole number and a unit (m, h or d), such as 90d; not {text}")
    return datetime.now(UTC) + timedelta(seconds=int(amount) * _DURATION[unit])


def _when(unix_time: int | None) -> str:
    return "-" if unix_time is None else datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%d %H:%M")


def cmd_keys(args: argparse.Namespace) -> None:
    from db.session import transaction
    from domain import keys

    if args.keys_command == "create":
        with transaction() as session:
            created = keys.create_key(session, tenant=args.tenant, scopes=_parse_scopes(args.scope),
                                      expires_at=_expiry(args.expires_in), actor=actor())
        if args.json:
            print(json.dumps(created))
        else:
            expiry = f", expiring {_when(created['expires_at'])} UTC" if created["expires_at"] else ""
            print(f"created key {created['id']} for tenant {args.tenant} with scopes "
                  f"{','.join(created['scopes'])}{expiry}")
            print("store it now; it is not shown again:")
            print(created["key"])
    elif args.keys_command == "list":
        with transaction() as session:
            listed = keys.list_keys(session)
        print(f"{'ID':<30} {'TENANT':<20} {'PREFIX':<14} {'STATE':<8} {'EXPIRES':<16} {'LAST USED':<16} SCOPES")
        for key in listed:
            expired = key["expires_at"] is not None and key["expires_at"] <= time.time()
            state = "revoked" if key["revoked"] else "expired" if expired else "active"
            print(f"{key['id']:<30} {key['tenant']:<20} {key['prefix'] + '…':<14} {state:<8} "
                  f"{_when(key['expires_at']):<16} {_when(key['last_used_at']):<16} {','.join(key['scopes'])}")
    elif args.keys_command == "revoke":
        with transaction() as session:
            if not keys.revoke_key(session, key_id=args.key_id, actor=actor()):
                raise SystemExit(f"error: no active key {args.key_id}")
        print(f"revoked {args.key_id}")


def cmd_secrets(_: argparse.Namespace) -> None:
    from db.session import transaction
    from domain import audit, webhooks

    with transaction() as session:
        count = webhooks.reseal_secrets(session)
        audit.record(session, actor=actor(), action="secrets.resealed", target=None, details={"secrets": count})
    print(f"sealed {count} webhook secrets with the first key of LLMOS_SECRET_KEY; older keys may now be removed")


def cmd_audit(args: argparse.Namespace) -> None:
    from db.session import transaction
    from domain import audit

    with transaction() as session:
        found = audit.entries(session, limit=args.limit)
    if args.json:
        print(json.dumps(found))
        return
    for entry in found:
        details = json.dumps(entry["details"], sort_keys=True) if entry["details"] else ""
        print(f"{_when(entry['created_at'])}  {entry['actor']:<20} {entry['action']:<18} {entry['target'] or '-'}"
              f"  {details}")


def _limit_text(value: Any) -> str:
    return "unlimited" if value is None else str(value)


def _print_tenant(tenant: dict[str, Any]) -> None:
    defaults = set(tenant["defaults"])
    print(f"tenant {tenant['name']} ({tenant['id']}), weight {tenant['weight']:g}")
    for limit, used in (("rpm", None), ("tpm", None), ("max_active_jobs", "active_jobs"),
                        ("max_storage_bytes", "storage_bytes"), ("max_webhook_endpoints", "webhook_endpoints"),
                        ("max_active_batches", "active_batches")):
        origin = " (default)" if limit in defaults else ""
        usage = f"   in use: {tenant[used]}" if used else ""
        print(f"  {limit:<22} {_limit_text(tenant[limit]) + origin:<24}{usage}")


def cmd_tenants(args: argparse.Namespace) -> None:
    from core.errors import ServiceError
    from db.session import transaction
    from domain import tenants

    try:
        with transaction() as session:
            if args.tenants_command == "list":
                found: Any = tenants.list_tenants(session)
            elif args.tenants_command == "show":
                found = tenants.show_tenant(session, name=args.name)
            else:
                limits = {name: getattr(args, name) for name in tenants.LIMITS}
                found = tenants.set_limits(session, name=args.name, weight=args.weight, actor=actor(), **limits)
    except ServiceError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    if args.json:
        print(json.dumps(found))
    elif args.tenants_command == "list":
        print(f"{'NAME':<20} {'RPM':>10} {'TPM':>10} {'JOBS':>11} {'WEIGHT':>7}")
        for tenant in found:
            jobs = f"{tenant['active_jobs']}/{_limit_text(tenant['max_active_jobs'])}"
            print(f"{tenant['name']:<20} {_limit_text(tenant['rpm']):>10} {_limit_text(tenant['tpm']):>10} "
                  f"{jobs:>11} {tenant['weight']:>7g}")
    else:
        _print_tenant(found)


def _detect_model(path: Path) -> tuple[str, list[str]]:
    config = json.loads((path / "config.json").read_text())
    archs = " ".join(config.get("architectures") or [config.get("model_type", "")])
    if "CausalLM" in archs or config.get("model_type") in ("gpt2", "llama", "mistral", "qwen2"):
        return config.get("model_type", "causal-lm"), ["generation"]
    return config.get("model_type", "encoder"), ["classification", "ner"]


def cmd_models(args: argparse.Namespace) -> None:
    from db.session import transaction
    from domain import models

    if args.models_command == "list":
        with transaction() as session:
            listed = models.all_models(session)
        for model in listed:
            print(f"{model['id']:<40} {model['kind']:<11} {','.join(model['tasks']):<20} {model['path']}")
    elif args.models_command == "bootstrap":
        from ops.bootstrap import register_base_models

        print(", ".join(register_base_models(get_settings().models_dir)))
    elif args.models_command == "import":
        source = Path(args.path).resolve()
        if not (source / "config.json").exists():
            raise SystemExit(f"error: {source} has no config.json; expected a save_pretrained directory")
        architecture, tasks = _detect_model(source)
        dest = get_settings().models_dir / args.name
        if dest.exists():
            raise SystemExit(f"error: a model named {args.name} already exists at {dest}")
        shutil.copytree(source, dest)
        with transaction() as session:
            models.register_base_model(session, name=args.name, path=str(dest), tasks=tasks,
                                       architecture=architecture, description=f"imported from {source}",
                                       actor=actor())
        print(f"imported {args.name} ({architecture}; {', '.join(tasks)})")


def cmd_up(_: argparse.Namespace) -> None:
    from ops.up import run_up

    run_up()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmos", description="LLM OS: fine-tune and serve language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run everything on this machine (embedded Postgres/Redis when no URLs set)")
    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--workers", type=int, default=None,
                     help="API processes behind the port (default LLMOS_API_WORKERS, else one per CPU core, at most 4)")
    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="gpu,inference,cpu,webhooks",
                        help="comma-separated: gpu, inference, cpu, webhooks")
    sub.add_parser("beat", help="run the scheduler (reconciler)")
    sub.add_parser("flower", help="run Flower with basic auth")
    sub.add_parser("migrate", help="upgrade the database to head and register base models")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scope", action="append", help=f"repeatable or comma-separated: {', '.join(SCOPES)}")
    create.add_argument("--expires-in", metavar="DURATION", help="the key stops working after this: 30m, 12h, 90d")
    create.add_argument("--json", action="store_true")
    keys.add_parser("list", help="list keys")
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")

    secrets_cli = sub.add_parser("secrets", help="secrets at rest").add_subparsers(dest="secrets_command",
                                                                                   required=True)
    secrets_cli.add_parser("rotate", help="re-seal every stored webhook secret with the first LLMOS_SECRET_KEY")

    audit = sub.add_parser("audit", help="administrative actions: keys, tenant limits, model imports")
    audit.add_argument("--limit", type=int, default=50, help="newest entries shown (50)")
    audit.add_argument("--json", action="store_true")

    tenants = sub.add_parser("tenants", help="tenants: rate limits, quotas and scheduling weight").add_subparsers(
        dest="tenants_command", required=True)
    tenants.add_parser("list", help="every tenant with its limits").add_argument("--json", action="store_true")
    show = tenants.add_parser("show", help="one tenant's limits and usage")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    tset = tenants.add_parser("set", help="change a tenant's limits (0 = unlimited; applies within 5 s)")
    tset.add_argument("name")
    for flag in ("rpm", "tpm", "max-active-jobs", "max-storage-bytes", "max-webhook-endpoints",
                 "max-active-batches"):
        tset.add_argument(f"--{flag}", type=int, metavar="N")
    tset.add_argument("--weight", type=float, metavar="W", help="share of training workers against other tenants")
    tset.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True)
    models.add_parser("list", help="list registered models")
    models.add_parser("bootstrap", help="build the offline base models and register them")
    imp = models.add_parser("import", help="register a save_pretrained directory as a base model")
    imp.add_argument("path")
    imp.add_argument("--name", required=True)

    files = sub.add_parser("files", help="files (client)").add_subparsers(dest="files_command", required=True)
    up = files.add_parser("upload", help="upload a file")
    up.add_argument("path")
    up.add_argument("--purpose", default="fine-tune", choices=["fine-tune", "batch"])

    events = sub.add_parser("events", help="the event log (client)").add_subparsers(dest="events_command",
                                                                                    required=True)
    tail = events.add_parser("tail", help="print events, then follow new ones")
    tail.add_argument("--type", help="only this event type, e.g. fine_tuning.job.succeeded")
    tail.add_argument("--no-follow", action="store_true", help="print what is there and exit")

    jobs = sub.add_parser("jobs", help="fine-tuning jobs (client)").add_subparsers(dest="jobs_command",
                                                                                   required=True)
    jc = jobs.add_parser("create", help="create a job")
    jc.add_argument("--model", required=True)
    jc.add_argument("--training-file", required=True)
    jc.add_argument("--validation-file")
    jc.add_argument("--task", choices=["classification", "ner", "generation"])
    jc.add_argument("--epochs", type=int)
    jc.add_argument("--batch-size", type=int)
    jc.add_argument("--learning-rate", type=float)
    jc.add_argument("--suffix")
    jc.add_argument("--processes", type=int, help="data-parallel training processes (compute.processes)")
    jc.add_argument("--watch", action="store_true", help="then show a live progress bar")
    jl = jobs.add_parser("list", help="list jobs")
    jl.add_argument("--limit", type=int, default=20)
    for name in ("show", "watch", "cancel"):
        jobs.add_parser(name, help=f"{name} a job").add_argument("job_id")
    return parser


HANDLERS: dict[str, Any] = {
    "up": cmd_up, "api": cmd_api, "worker": cmd_worker, "beat": cmd_beat, "flower": cmd_flower,
    "migrate": cmd_migrate, "keys": cmd_keys, "tenants": cmd_tenants, "audit": cmd_audit,
    "secrets": cmd_secrets, "models": cmd_models,
}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Servers log their work at INFO; a client's output is what it prints, and INFO lines (httpx logs every
    # request) would interleave with it, so a client logs only warnings unless LLMOS_LOG_LEVEL asks for more.
    _setup_logging("WARNING" if args.command in CLIENT_COMMANDS else "INFO")
    if args.command in CLIENT_COMMANDS:
        from ops import client

        client.run(args)
        return
    try:
        HANDLERS[args.command](args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
