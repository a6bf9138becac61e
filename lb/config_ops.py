"""The configuration of operations: admin access, access logs, and client API keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

_Model = ConfigDict(extra="forbid", frozen=True)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class AccessLog(BaseModel):
    """One structured JSON line per request, on standard output."""

    model_config = _Model

    enabled: bool = Field(default=True, description="Write access-log lines.")
    sample_rate: float = Field(
        default=1.0, ge=0, le=1, description="Share of requests logged (errors always are)."
    )


class ClientAuth(BaseModel):
    """API keys a route requires from clients (``Authorization: Bearer`` or ``api-key``)."""

    model_config = _Model

    api_keys: list[str] = Field(
        default_factory=list, description="Accepted keys; use ${VAR} to read them from the env."
    )
    api_keys_env: str | None = Field(
        default=None, description="Environment variable holding more keys, comma separated."
    )
    forward_key: bool = Field(
        default=False, description="Pass the client's key header on to the backend."
    )

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, value: list[str]) -> list[str]:
        if any(not key.strip() for key in value):
            raise ValueError("an API key is empty")
        return value
