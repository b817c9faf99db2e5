"""Settings shared by every service: pydantic-settings, env prefix `FEDMQ_`, CLI flags on top."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"


class ServiceSettings(BaseSettings):
    """What every fedmq process needs: where the broker is, how to log, where metrics go."""

    model_config = SettingsConfigDict(env_prefix="FEDMQ_", extra="ignore")

    amqp_url: str = DEFAULT_AMQP_URL
    ca_file: Path | None = None
    """CA bundle that signs the broker's certificate (amqps)."""
    cert_file: Path | None = None
    """Client certificate for amqps with peer verification."""
    key_file: Path | None = None
    allow_insecure_remote: bool = False
    """Permit plain amqp:// to a host that is not loopback (credentials travel in clear)."""
    heartbeat: int = Field(default=30, ge=0, le=600)
    task_id: str = "pneumonia"
    log_level: str = "INFO"
    log_json: bool | None = None
    """JSON logs; default: JSON unless stderr is a terminal."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Prometheus endpoint port; none by default, 0 picks a free one."""
