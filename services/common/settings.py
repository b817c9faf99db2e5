"""Settings shared by every service: pydantic-settings, env prefix `FEDMQ_`, CLI flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.topology import QueueType

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
"""Long enough for a broker started at the same time (compose) to come up."""


class ServiceSettings(BaseSettings):
    """What every fedmq process needs: where the broker is, how to log, where metrics go."""

    model_config = SettingsConfigDict(
        env_prefix="FEDMQ_", extra="ignore", use_attribute_docstrings=True
    )

    amqp_url: str = DEFAULT_AMQP_URL
    """Broker URL, amqp://user:password@host:port/vhost or amqps:// for TLS."""
    amqp_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """The nodes of a RabbitMQ cluster, comma-separated; replaces `amqp_url` when given.
    The bus connects to the first that answers and moves to the next when its node goes."""
    ca_file: Path | None = None
    """CA bundle that signs the broker's certificate (amqps)."""
    cert_file: Path | None = None
    """Client certificate for amqps with peer verification."""
    key_file: Path | None = None
    """Private key of the client certificate."""
    allow_insecure_remote: bool = False
    """Permit plain amqp:// to a host that is not loopback (credentials travel in clear)."""
    follower_queue_type: QueueType = "classic"
    """Type of the follower queue a trainer or evaluator declares: `quorum` on a cluster."""
    heartbeat: int = Field(default=30, ge=0, le=600)
    """AMQP heartbeat in seconds (0 turns it off)."""
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT_S, gt=0.0)
    """Seconds to keep trying to reach the broker at start-up before giving up."""
    task_id: str = "pneumonia"
    """The task (one federation) this process takes part in."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level; DEBUG also shows the AMQP client's own log lines."""
    log_json: bool | None = None
    """JSON logs; default: JSON unless stderr is a terminal."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint (off when unset; 0 picks a free port, logged)."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("amqp_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    @property
    def broker_urls(self) -> list[str]:
        """The URLs the bus tries in turn: `amqp_urls`, else the single `amqp_url`."""
        return list(self.amqp_urls) or [self.amqp_url]
