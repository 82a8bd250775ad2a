"""Errors as OpenAI's API returns them: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every failure the server reports goes through ``APIError`` (raised anywhere in a handler) or one of the
constructors below, so the JSON shape and the status that goes with each kind of error are decided here only:

=====  ===========================  ==========================================================================
400    ``invalid_request_error``    malformed JSON, a missing/mistyped/out-of-range field, an unsupported
                                    option (``n`` > 1, ``logprobs``, tools), a prompt longer than the context
401    ``authentication_error``     a missing or wrong API key
404    ``not_found_error``          an unknown model or path
405    ``invalid_request_error``    a wrong method for the path
413    ``invalid_request_error``    a body over ``MAX_BODY_BYTES``
429    ``rate_limit_error``         the scheduler's queue of waiting requests is full (``QueueFullError``)
500    ``server_error``             a request the engine failed, or a bug
503    ``service_unavailable``      the loader is gone (the server then exits) or the server is shutting down
=====  ===========================  ==========================================================================
"""

from __future__ import annotations

from starlette.responses import JSONResponse

MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is parsed


class APIError(Exception):
    """An error for the client: raised in a handler, answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, type="invalid_request_error", param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist: this server serves '{served}' (GET /v1/models lists it)",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


def over_capacity(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable")


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
