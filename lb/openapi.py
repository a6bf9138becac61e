"""The OpenAPI 3.1 description of the admin listener, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from lb import __version__

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            "required": ["type", "message"],
        }
    },
}
_BACKEND = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "url": {"type": "string"},
        "weight": {"type": "integer"},
        "effective_weight": {"type": "number"},
        "max_concurrency": {"type": ["integer", "null"]},
        "healthy": {"type": "boolean"},
        "available": {"type": "boolean"},
        "drained": {"type": "boolean"},
        "ejected": {"type": "boolean"},
        "ejected_for_s": {"type": "number"},
        "held_for_s": {
            "type": "number",
            "description": "Seconds left of a hold asked for by a 503 or 429's Retry-After.",
        },
        "ejections_total": {"type": "integer"},
        "in_flight": {"type": "integer"},
        "latency_estimate_s": {"type": "number"},
        "requests_total": {"type": "integer"},
        "failures_total": {"type": "integer"},
        "responses_by_class": {"type": "object", "additionalProperties": {"type": "integer"}},
        "health_check": {
            "type": ["object", "null"],
            "description": "The active health check's last probe (null when checks are off).",
            "properties": {
                "last_result": {"type": "string"},
                "last_duration_s": {"type": "number"},
                "passed_total": {"type": "integer"},
                "failed_total": {"type": "integer"},
            },
        },
        "load_report": {
            "type": ["object", "null"],
            "description": "The load the backend reports on its /metrics, as last scraped "
            "(null when load_report is off); age_s null until a scrape succeeded.",
            "properties": {
                "waiting": {"type": ["number", "null"]},
                "running": {"type": ["number", "null"]},
                "kv_usage": {"type": ["number", "null"]},
                "age_s": {"type": ["number", "null"]},
                "last_error": {"type": "string"},
                "missing": {"type": "array", "items": {"type": "string"}},
                "ok_total": {"type": "integer"},
                "failed_total": {"type": "integer"},
            },
        },
        "latency": {
            "type": "object",
            "description": "Attempt durations: bucket bounds, non-cumulative counts (last: +Inf).",
            "properties": {
                "buckets": {"type": "array", "items": {"type": "number"}},
                "counts": {"type": "array", "items": {"type": "integer"}},
                "sum": {"type": "number"},
            },
        },
    },
    "required": ["name", "url", "healthy", "available", "drained", "in_flight"],
}
_POOL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "strategy": {"type": "string"},
        "panicking": {"type": "boolean"},
        "queue_depth": {"type": "integer"},
        "responses_by_class": {"type": "object", "additionalProperties": {"type": "integer"}},
        "retries_total": {"type": "integer"},
        "retries": {"type": "object", "additionalProperties": {"type": "integer"}},
        "client_disconnects": {"type": "integer"},
        "recent_errors": {"type": "array", "items": {"type": "object"}},
        "backends": {"type": "array", "items": {"$ref": "#/components/schemas/Backend"}},
    },
    "required": ["name", "strategy", "backends"],
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_REF_BACKEND = {"$ref": "#/components/schemas/Backend"}
_REF_POOL = {"$ref": "#/components/schemas/Pool"}
_REF_ERROR = {"$ref": "#/components/schemas/Error"}
_AUTH_FAILED = _json(_REF_ERROR, "Missing or wrong admin token; nothing changed.")
_NOT_FOUND = _json(_REF_ERROR, "No such pool or backend.")
_POOL_PARAM = {"name": "pool", "in": "path", "required": True, "schema": {"type": "string"}}
_BACKEND_PARAM = {"name": "backend", "in": "path", "required": True, "schema": {"type": "string"}}


def _backend_action(summary: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": [_POOL_PARAM, _BACKEND_PARAM],
        "responses": {"200": _json(_REF_BACKEND), "401": _AUTH_FAILED, "404": _NOT_FOUND},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        op["responses"]["400"] = _json(_REF_ERROR, "Invalid body.")
    return {"post": op}


def spec() -> dict[str, Any]:
    """The admin API's OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "lb admin API", "version": __version__},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Backend": _BACKEND, "Pool": _POOL, "Error": _ERROR},
        },
        "paths": {
            "/api/v1/state": {
                "get": {
                    "summary": "Every pool and backend with its live state.",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "version": {"type": "string"},
                                    "draining": {"type": "boolean"},
                                    "uptime_s": {"type": "number"},
                                    "time": {"type": "number"},
                                    "pools": {"type": "array", "items": _REF_POOL},
                                },
                            }
                        )
                    },
                }
            },
            "/api/v1/pools": {
                "get": {
                    "summary": "Every pool with its backends.",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"pools": {"type": "array", "items": _REF_POOL}},
                            }
                        )
                    },
                }
            },
            "/api/v1/pools/{pool}": {
                "get": {
                    "summary": "One pool with its backends.",
                    "parameters": [_POOL_PARAM],
                    "responses": {"200": _json(_REF_POOL), "404": _NOT_FOUND},
                }
            },
            "/api/v1/pools/{pool}/decisions": {
                "get": {
                    "summary": "The pool's last routing decisions: backend and reason.",
                    "parameters": [_POOL_PARAM],
                    "responses": {"200": _json({"type": "object"}), "404": _NOT_FOUND},
                }
            },
            "/api/v1/pools/{pool}/backends": {
                "get": {
                    "summary": "The pool's backends and their live state.",
                    "parameters": [_POOL_PARAM],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "pool": {"type": "string"},
                                    "backends": {"type": "array", "items": _REF_BACKEND},
                                },
                            }
                        ),
                        "404": _NOT_FOUND,
                    },
                }
            },
            "/api/v1/pools/{pool}/backends/{backend}": {
                "get": {
                    "summary": "One backend and its live state.",
                    "parameters": [_POOL_PARAM, _BACKEND_PARAM],
                    "responses": {"200": _json(_REF_BACKEND), "404": _NOT_FOUND},
                }
            },
            "/api/v1/routes": {
                "get": {
                    "summary": "The routing table.",
                    "responses": {"200": _json({"type": "object"})},
                }
            },
            "/api/v1/config": {
                "get": {
                    "summary": "The running configuration, secrets redacted.",
                    "responses": {"200": _json({"type": "object"})},
                }
            },
            "/api/v1/pools/{pool}/backends/{backend}/drain": _backend_action(
                "Drain a backend: no new requests; requests in flight finish."
            ),
            "/api/v1/pools/{pool}/backends/{backend}/undrain": _backend_action(
                "Return a drained backend to service."
            ),
            "/api/v1/pools/{pool}/backends/{backend}/weight": _backend_action(
                "Set a backend's weight (until the next reload).",
                {
                    "type": "object",
                    "properties": {"weight": {"type": "integer", "minimum": 1, "maximum": 10000}},
                    "required": ["weight"],
                },
            ),
            "/api/v1/reload": {
                "post": {
                    "summary": "Reload the configuration file (as SIGHUP does).",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": _json({"type": "object"}),
                        "400": _json(_REF_ERROR, "Invalid file; the running config is kept."),
                        "401": _AUTH_FAILED,
                    },
                }
            },
        },
    }
