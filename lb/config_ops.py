"""The configuration of operations: admin access, access logs, client API keys, backend TLS."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from lb.config_base import ConfigModel

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class AccessLog(ConfigModel):
    """One structured JSON line per request, on standard output."""

    enabled: bool = Field(default=True, description="Write access-log lines.")
    sample_rate: float = Field(
        default=1.0, ge=0, le=1, description="Share of requests logged (errors always are)."
    )


class ClientAuth(ConfigModel):
    """API keys a route requires from clients (``Authorization: Bearer`` or ``api-key``)."""

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


class BackendTLS(ConfigModel):
    """How the proxy checks ``https://`` backends, and the certificate it shows them."""

    ca_file: str | None = Field(
        default=None,
        description="PEM file of the CAs that sign the backends' certificates; "
        "default: the system's trusted CAs.",
    )
    verify: bool = Field(
        default=True,
        description="Check the backends' certificates and names; false accepts any "
        "certificate (traffic is still encrypted, but not authenticated).",
    )
    server_name: str | None = Field(
        default=None,
        description="Name sent in SNI and expected in the certificate; default: the backend's "
        "host.",
    )
    cert_file: str | None = Field(
        default=None, description="PEM client certificate, for backends that require one."
    )
    key_file: str | None = Field(
        default=None, description="PEM private key of cert_file (if not inside cert_file)."
    )

    @model_validator(mode="after")
    def _key_needs_cert(self) -> BackendTLS:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")
        return self
