"""One typed settings object, read from ``KIBAN_*`` environment variables (12-factor).

Every setting is documented here and in the README's settings table; a bad value fails
at start-up with the variable's name, never halfway through a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from kiban.errors import ConfigurationError

DEFAULT_HOME = Path(".kiban")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """All of kiban's configuration; field ``x`` is read from ``KIBAN_X``."""

    model_config = SettingsConfigDict(env_prefix="KIBAN_", extra="ignore", frozen=True)

    home: Path = Field(
        DEFAULT_HOME,
        description="Local working directory for the embedded default (store, Qdrant, caches).",
    )
    store_uri: str | None = Field(
        None,
        description="Where kiban keeps its state: file:///dir or s3://bucket/prefix. "
        "Default: file://<home>/store.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for MinIO/SeaweedFS; unset for AWS."
    )
    s3_region: str | None = Field(None, description="S3 region; unset uses the AWS chain.")
    qdrant_url: str | None = Field(
        None, description="Qdrant server URL; unset uses Qdrant local mode at qdrant_path."
    )
    qdrant_api_key: SecretStr | None = Field(None, description="Qdrant API key (never logged).")
    qdrant_path: Path | None = Field(
        None, description="Qdrant local-mode directory. Default: <home>/qdrant."
    )
    ort_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
        description="ONNX Runtime execution providers in order of preference "
        "(comma-separated); unavailable ones are skipped and the one that ran is recorded.",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Images per inference call.")
    gpu_batch_size: int = Field(
        128,
        ge=1,
        le=4096,
        description="Images per inference call when a GPU provider (CUDA/TensorRT) runs; "
        "also TensorRT's largest profile shape. The CPU keeps batch_size.",
    )
    chunk_size: int = Field(
        256, ge=1, le=20_000, description="Images per encode task (one shard each)."
    )
    ingest_page_size: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Listing entries per ingest page: one validation task each (any ingest "
        "worker takes it); an ingest process holds one page, never the whole night.",
    )
    ingest_page_wait: int = Field(
        120,
        ge=1,
        le=24 * 3600,
        description="Seconds the ingest reducer waits for a page another worker claimed before "
        "validating it itself (a killed worker's page is redone after at most this).",
    )
    threads: int = Field(
        0, ge=0, le=512, description="ONNX Runtime intra-op threads; 0 = all cores."
    )
    decode_workers: int = Field(
        2, ge=1, le=256, description="Threads decoding images while the model runs."
    )
    max_image_pixels: int = Field(
        80_000_000, ge=1, description="Decompression-bomb guard: larger images are quarantined."
    )
    min_image_side: int = Field(
        8, ge=1, description="Images with a side shorter than this are quarantined."
    )
    price_per_hour: float | None = Field(
        None,
        ge=0,
        description="Hourly price of one encoder worker (for cost per 1k images); "
        "unset leaves cost out of the report.",
    )
    price_currency: str = Field("USD", description="Currency label for price_per_hour.")
    device_label: str = Field(
        "cpu", description="Free-text name of the hardware, printed in cost tables."
    )
    max_object_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024,
        description="Largest object or file kiban reads (images, manifests), enforced while "
        "streaming: a larger one is quarantined (images) or refused (manifests).",
    )
    allowed_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Distributed mode: the only local directories (comma-separated) that file:// "
        "sources, manifests and export destinations in messages may name; others are "
        "dead-lettered. Embedded mode (your own command line) is not restricted.",
    )
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="If set, the only S3 buckets (comma-separated) that sources, manifests and "
        "export destinations in messages may name.",
    )
    allow_synthetic_sources: bool = Field(
        True,
        description="Distributed mode: whether a message may name a synthetic:// source "
        "(generated load-test images; reads no file or bucket). Set false to refuse them "
        "(dead-lettered). Never a manifest or an export destination. Embedded: always allowed.",
    )
    max_message_bytes: int = Field(
        256 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest queue message a worker parses; larger ones are dead-lettered unread "
        "(a truncated copy and its sha256 are kept).",
    )
    volume_images_per_night: int | None = Field(
        None,
        ge=1,
        le=10**12,
        description="Images a night brings, for the report's cost projection (hours and price "
        "per night and per month); unset leaves the projection out. `--volume` overrides it.",
    )
    noninferiority_margin: float = Field(
        0.01,
        ge=0,
        le=1,
        description="δ of the verdict: a cheaper model is 'within δ' of another when the paired "
        "95% CI of its MV@k macro-F1 difference has its lower bound above −δ.",
    )
    variant_min_overlap: float = Field(
        0.8,
        ge=0,
        le=1,
        description="`kiban models quantize`: a precision variant whose top-5 neighbour overlap "
        "with its parent is below this is published with a warning on its card.",
    )
    learning_curve_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [5, 10, 20, 50, 100],
        description="Labelled images per class in the index at each learning-curve point "
        "(comma-separated; 'all' is always added).",
    )
    learning_curve_repeats: int = Field(
        5, ge=1, le=1000, description="Seeded random subsets drawn per learning-curve point."
    )
    eval_exact_max_vectors: int = Field(
        100_000,
        ge=1,
        le=100_000_000,
        description="Batches with at most this many images are evaluated in memory, every "
        "query exactly (all-vs-all); larger ones by a seeded class-stratified query sample, "
        "still exact against the full index, streamed one shard at a time (memory bounded by "
        "the chunk). Default from bench/bench_reporter_scale.py --all-vs-all 60000 here: "
        "53-91 s and 712-827 MB peak over two runs (one model, D = 512, 2 shared cores); "
        "time grows with N squared.",
    )
    eval_sample_queries: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Queries sampled when a batch is above eval_exact_max_vectors (a request's "
        "query_sample takes precedence).",
    )
    trend_window: int = Field(
        7,
        ge=2,
        le=365,
        description="Earlier reports of the same schedule forming the trailing baseline of the "
        "trend and its regression flag.",
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker (Redis) URL; may hold a password."
    )
    mode: Literal["embedded", "distributed"] = Field(
        "embedded",
        description="embedded runs the Celery tasks in-process; distributed sends them to workers.",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    task_retries: int = Field(
        5, ge=0, le=50, description="Retries of a task after a transient S3/Qdrant/Redis error."
    )
    retry_backoff_seconds: int = Field(
        1,
        ge=1,
        le=600,
        description=(
            "Backoff factor of task retries in whole seconds (Celery retry_backoff): the n-th "
            "retry waits a random time up to factor x 2^n, at most 60 s. Read at worker start."
        ),
    )
    visibility_timeout: int = Field(
        60,
        ge=5,
        le=24 * 3600,
        description="Seconds after its worker's last lease renewal before Redis re-delivers an "
        "unacknowledged task: a killed worker's task is redone this long (+ at most 10 s) after "
        "it died. A live worker renews the lease of every task it holds (every "
        "min(10, timeout/6) s), so a task may run longer; see docs/deployment.md, Redelivery.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address a worker's /metrics binds to; 0.0.0.0 opens it to the network "
        "(the chart sets it so Prometheus can scrape pods).",
    )
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Port of a worker's Prometheus /metrics (0 = off)."
    )
    schedule_cron: str = Field(
        "0 2 * * *", description="Nightly schedule (cron: minute hour day month weekday)."
    )
    schedule_source: str | None = Field(
        None,
        description="Source URI of the nightly batch; {date} is replaced by the night's date "
        "(YYYY-MM-DD), e.g. s3://images/incoming/{date}/. Unset disables the schedule.",
    )
    schedule_manifest: str | None = Field(
        None, description="Manifest URI of the nightly batch ({date} replaced), optional."
    )
    schedule_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models the nightly batch is encoded with (comma-separated).",
    )
    encode_pools: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Route models to encoder pools: 'vit-b-32=gpu,effnet=cpu' sends that "
        "model's chunks to queue encode.<pool>; others go to queue 'encode'.",
    )

    @field_validator("encode_pools", mode="before")
    @classmethod
    def _split_pools(cls, value: object) -> object:
        if isinstance(value, str):
            pools = {}
            for item in filter(None, (v.strip() for v in value.split(","))):
                model, sep, pool = item.partition("=")
                if not sep or not model.strip() or not pool.strip():
                    raise ValueError(f"expected model=pool, got {item!r}")
                pools[model.strip()] = pool.strip()
            return pools
        return value

    def encode_queue_for(self, model: str) -> str:
        pool = self.encode_pools.get(model)
        return f"encode.{pool}" if pool else "encode"

    @field_validator(
        "ort_providers", "schedule_models", "allowed_roots", "allowed_buckets", mode="before"
    )
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("learning_curve_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        return value

    @field_validator("learning_curve_sizes")
    @classmethod
    def _check_sizes(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError("expected positive integers, e.g. 5,10,20,50,100")
        return sorted(set(value))

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("schedule_cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("expected 5 cron fields: minute hour day-of-month month day-of-week")
        return value

    @field_validator("store_uri")
    @classmethod
    def _check_store_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("file://", "s3://")):
            raise ValueError("must start with file:// or s3://")
        return value

    @property
    def resolved_store_uri(self) -> str:
        """The store URI with the default filled in from ``home``."""
        if self.store_uri:
            return self.store_uri
        return (self.home / "store").resolve().as_uri()

    @property
    def resolved_qdrant_path(self) -> Path:
        return self.qdrant_path or self.home / "qdrant"

    @classmethod
    def env_name(cls, field: str) -> str:
        return f"KIBAN_{field.upper()}"


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a validation error into one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{Settings.env_name(field)}: {err['msg']}")
        raise ConfigurationError("invalid setting — " + "; ".join(problems)) from None
    except SettingsError as exc:
        raise ConfigurationError(f"invalid setting — {exc}") from None


_active: Settings | None = None


def get_settings() -> Settings:
    """Process-wide settings: read once from the environment unless set by ``use_settings``."""
    global _active
    if _active is None:
        _active = load_settings()
    return _active


def use_settings(settings: Settings | None) -> None:
    """Make ``settings`` the process-wide settings (the CLI and tests; None re-reads env)."""
    global _active
    _active = settings


def settings_table() -> str:
    """The Markdown table of every setting (README's settings section is generated from it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        if isinstance(default, list):
            default = ",".join(str(d) for d in default)
        shown = f"`{default}`" if default not in (None, "", {}) else "–"
        rows.append(f"| `{Settings.env_name(name)}` | {shown} | {field.description} |")
    return "\n".join(rows)
