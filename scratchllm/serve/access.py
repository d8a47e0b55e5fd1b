"""What every API route checks first: the API key and the model's name. Routers import these from
here (not from app.py, which imports the routers)."""

from __future__ import annotations

import hmac

from fastapi import Request

from .schemas import APIError


def authorize(request: Request) -> None:
    """A 401 unless the request carries the server's API key (when it has one)."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "missing or incorrect API key: send the header `Authorization: Bearer KEY` "
            "(the key the server was started with)",
            code="invalid_api_key",
        )


def check_model(request: Request, name: str) -> None:
    """A 404 unless `name` is the served model's id."""
    model_id = request.app.state.settings.model_id
    if name != model_id:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {model_id!r}",
            param="model",
            code="model_not_found",
        )


__all__ = ["authorize", "check_model"]
