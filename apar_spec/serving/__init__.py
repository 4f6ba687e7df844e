"""Serving: continuous batching of many requests' token trees (``Engine``); the HTTP face
lives in ``apar_spec.serving.http`` (needs the ``serve`` extra)."""

from apar_spec.serving.engine import BranchDelta, Engine, RequestError, RequestHandle, StreamEvent

__all__ = ["BranchDelta", "Engine", "RequestError", "RequestHandle", "StreamEvent"]
