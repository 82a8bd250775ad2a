"""The exceptions compute sees from the loader connection (re-exported by ``protocol.client``)."""

from __future__ import annotations


class LoaderError(RuntimeError):
    """The loader refused a request, answered nonsense, or stopped making progress; the message says which."""

    def __init__(self, message: str, code: str = "client"):
        super().__init__(message)
        self.code = code  # an Error.code from the loader, or "client" for a failure seen on this side


class LoaderGone(LoaderError):
    """The loader process is dead (or a zombie): nothing it shared can be trusted any more."""

    def __init__(self, message: str):
        super().__init__(message, code="gone")


class RingOrderError(RuntimeError):
    """Compute acquired or released a streamed unit out of the ring's order (a bug in the caller)."""
