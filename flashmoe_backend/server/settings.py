"""What a server is started with: the served model's id, its limits and its API key.

Standard library only: the CLI reads the defaults before deciding to import the server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Settings of one server; the model is the engine it is given, chosen at start.

    Attributes:
        model_id: the name ``/v1/models`` lists; a request naming another model gets 404.
        api_key: when set, every request but ``GET /health`` needs ``Authorization: Bearer
            <api_key>`` (401).
        max_queue: requests that may wait while one generates; beyond them 429.
        timeout: seconds a request may take, waiting in the queue included (504 / an error
            event); ``None``: no limit.
        max_body_bytes: the largest request body accepted (413).
        max_tokens_limit: the largest ``max_tokens`` a request may ask for (400).
    """

    model_id: str
    api_key: str | None = None
    max_queue: int = 16
    timeout: float | None = 600.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 8192
