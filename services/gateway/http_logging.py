"""Keeps what clients send out of the gateway's log when aiohttp rejects a malformed request.

aiohttp logs such rejections with a traceback whose message quotes the offending header line, and
that line can be `Authorization: Bearer <key>`. The filter keeps the event, as one WARNING line
naming only the kind of error.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

_LOGGER = "aiohttp.server"


class _RedactMalformed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "rejected a malformed HTTP request: %s (HTTP %s)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install() -> None:
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _RedactMalformed) for f in logger.filters):
        logger.addFilter(_RedactMalformed())
