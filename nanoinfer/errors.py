"""Typed errors: bad input becomes one of these, with a message meant for a person."""


class NanoInferError(Exception):
    """Base class of every error nanoinfer raises on purpose."""


class ModelLoadError(NanoInferError):
    """A model path, package or file that cannot be loaded (missing, corrupt, unsupported)."""


class RequestError(NanoInferError, ValueError):
    """A request that cannot be served as asked (too long for the context, bad parameters)."""
