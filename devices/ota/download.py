"""HTTP reads for the agent (standard library only): size-limited GETs and resumable downloads.

A download continues a partial file with an HTTP ``Range`` request after a dropped connection
(within one attempt and across agent restarts), never reads more than the channel promised,
and checks size and SHA-256 at the end.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edgesmith.errors import UpdateError

__all__ = ["download", "fetch", "post_json"]

log = logging.getLogger(__name__)

CHUNK = 64 << 10
USER_AGENT = "edgesmith-ota/1"
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    socket.timeout,
    TimeoutError,
)


def fetch(url: str, limit: int, timeout: float = 30.0) -> bytes:
    """GET ``url``; refuse bodies over ``limit`` bytes.

    Raises:
        UpdateError: HTTP error, network error, or a body that is too large.
    """
    req = urllib.request.Request(
        url, headers={"User-Agent": USER_AGENT, "Cache-Control": "no-cache"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: bytes = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise UpdateError(
            f"GET {url}: HTTP {exc.code} {exc.reason}", hint="check the server URL and channel name"
        ) from None
    except _NETWORK_ERRORS as exc:
        raise UpdateError(f"GET {url}: {exc}", hint="is the update server reachable?") from None
    if len(data) > limit:
        raise UpdateError(f"GET {url}: more than {limit} bytes", hint="this is not a channel file")
    return data


def post_json(url: str, body: bytes, timeout: float = 5.0) -> int:
    """POST a JSON body; returns the HTTP status (raises nothing for HTTP errors)."""
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _content_range_start(header: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)", header or "")
    return int(m.group(1)) if m else None


def download(
    url: str,
    part: Path,
    size: int,
    sha256: str,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout: float = 30.0,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Download ``url`` to ``part`` (resuming what is there), check it, and rename it to ``.tar``.

    Args:
        url: the bundle URL.
        part: the partial file (``<sha256>.part``); kept across failures so the next try resumes.
        size, sha256: what the signed channel promised.
        retries: reconnects after a dropped or failed connection.
        backoff_s: first wait between reconnects (doubles each time).
        on_bytes: called with the total bytes on disk after each chunk (progress, fault tests).

    Returns:
        The verified file (``part`` with suffix ``.tar``).

    Raises:
        UpdateError: still incomplete after ``retries``, more bytes than promised, or a SHA-256
            mismatch (the partial file is deleted then, so the next try starts clean).
        OSError: the disk is full or unwritable (the caller cleans up).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    final = part.with_suffix(".tar")
    last_error = ""
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            break
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 30.0))
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            ) as resp:
                if have and resp.status == 200:
                    log.info("server ignored the Range request; starting %s again", url)
                    have = 0
                elif have and _content_range_start(resp.headers.get("Content-Range")) != have:
                    raise UpdateError(
                        f"GET {url}: the server resumed at the wrong offset",
                        hint="the server's Range support is broken",
                    )
                with open(part, "ab" if have else "wb") as f:
                    while have < size:
                        block = resp.read(min(CHUNK, size - have))
                        if not block:
                            break
                        f.write(block)
                        have += len(block)
                        if on_bytes:
                            on_bytes(have)
                    f.flush()
                    os.fsync(f.fileno())
                if have == size and resp.read(1):
                    raise UpdateError(
                        f"GET {url}: the server sent more than the {size} bytes the channel promised",
                        hint="the store is out of step with its channel file; republish",
                    )
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # nothing past what we have: the server's file is shorter
                last_error = f"the server has fewer bytes than the {size} the channel promised"
                break
            last_error = f"HTTP {exc.code} {exc.reason}"
            if exc.code in (401, 403, 404, 410):
                break
        except _NETWORK_ERRORS as exc:
            last_error = str(exc) or type(exc).__name__
            log.info("download of %s interrupted at byte %d: %s", url, have, last_error)
    have = part.stat().st_size if part.exists() else 0
    if have != size:
        raise UpdateError(
            f"GET {url}: got {have} of {size} bytes ({last_error or 'connection closed early'})",
            hint="the download resumes at the next check",
        )
    h = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if h.hexdigest() != sha256:
        part.unlink()
        raise UpdateError(
            f"GET {url}: the bundle's SHA-256 does not match the signed channel",
            hint="the file on the server or in transit was altered; it was discarded",
        )
    os.replace(part, final)
    return final
