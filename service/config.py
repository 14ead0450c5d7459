"""Settings shared by the API and the workers: environment variables prefixed SMOOTHCERT_.

Defaults run locally with no configuration. Invalid values fail at start-up, not on the
first request. List settings take a comma-separated string (SMOOTHCERT_API_KEYS=a,b).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Positive = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMOOTHCERT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "sc"

    # API keys: with none configured the API is open; otherwise every request needs one, a key
    # sees only its own jobs, and admin keys may upload models and reset memories.
    api_keys: Annotated[list[str], NoDecode] = []
    admin_keys: Annotated[list[str], NoDecode] = []

    # Limits: every one is explicit and answered with a 4xx naming it.
    max_body_bytes: Positive = 8 * 2**20
    max_bundle_bytes: Positive = 256 * 2**20
    max_pixels: Positive = 1024 * 1024
    max_n: Positive = 1_000_000
    max_n0: Positive = 100_000
    max_batch_size: Positive = 20_000
    max_queue: Positive = 10_000
    max_wait_seconds: Annotated[float, Field(gt=0, le=300)] = 30.0
    max_dataset_bytes: Positive = 64 * 2**20
    max_evaluation_examples: Positive = 10_000

    # Jobs and their inputs expire this long after they are created.
    job_ttl_seconds: Positive = 24 * 3600
    # A job running longer fails with a clear reason; the broker's visibility timeout is
    # set above it so that a live job is never handed to a second worker.
    job_time_limit_seconds: Positive = 3600

    # Workers.
    device: str | None = None  # "cpu", "cuda"; None: CUDA when present
    memory_capacity: Positive = 1_000_000
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 5.0

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _admins_are_keys(self) -> Settings:
        # An admin key is also an ordinary key: listing it once is enough.
        self.api_keys = list(dict.fromkeys([*self.api_keys, *self.admin_keys]))
        return self

    # How long the broker waits before handing an unacknowledged task (its worker died) to
    # another worker; None: the job time limit plus five minutes.
    visibility_timeout_seconds: Positive | None = None

    @property
    def visibility_timeout(self) -> int:
        return self.visibility_timeout_seconds or self.job_time_limit_seconds + 300


@lru_cache
def get_settings() -> Settings:
    return Settings()
