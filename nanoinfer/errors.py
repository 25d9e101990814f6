"""Typed errors: bad input becomes one of these, with a message meant for a person."""

from __future__ import annotations


class NanoInferError(Exception):
    """Base class of every error nanoinfer raises on purpose."""


class ModelLoadError(NanoInferError):
    """A model path, package or file that cannot be loaded (missing, corrupt, unsupported)."""


class RequestError(NanoInferError, ValueError):
    """A request that cannot be served as asked (too long for the context, bad parameters).

    `param` names the offending field where there is one, so the server can say which."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class EngineDeadError(NanoInferError):
    """The engine loop has stopped: nothing more can be served by this process."""


class EngineOverloadedError(NanoInferError):
    """Too many requests are waiting already; the caller should retry later."""
