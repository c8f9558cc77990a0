"""HTTP reads for the agent (standard library only): size-limited GETs and resumable downloads.

A download continues a partial file with an HTTP ``Range`` request after a dropped connection
(within one attempt and across agent restarts), never reads more than the channel promised,
and checks size and SHA-256 at the end.

Every request runs under a :class:`Deadline`: a watchdog shuts the request's socket down when it
passes, so no server can hold the agent longer than that (a server that trickles one byte per
second defeats a per-read timeout, not a deadline). Downloads also have a minimum rate: a
connection that delivers less than ``min_rate`` bytes/s over a ``window`` is dropped and resumed.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from edgesmith.errors import UpdateError

__all__ = ["Deadline", "download", "fetch", "post_json"]

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


class Deadline:
    """A moment by which a network operation must be over (monotonic clock).

    Example:
        >>> d = Deadline(30.0, "update check"); 0 < d.remaining() <= 30
        True
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = float(seconds)
        self.what = what
        self.at = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def within(self, seconds: float, what: str) -> Deadline:
        """A deadline ``seconds`` from now, or this one if it comes first."""
        if self.remaining() <= seconds:
            return self
        return Deadline(seconds, what)

    def error(self, url: str) -> UpdateError:
        return UpdateError(
            f"GET {url}: not done within the {self.what} deadline of {self.seconds:g} s",
            hint="the server or the network is too slow; the next check tries again",
        )


class _Watchdog:
    """Shuts down the sockets of a request when its deadline passes (from a timer thread)."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(deadline.remaining(), 0.0), self._fire)
        self._timer.daemon = True

    def add(self, sock: Any) -> None:
        with self._lock:
            self._socks.append(sock)
            fired = self.fired
        if fired:
            self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._socks)
        for s in socks:
            self._shut(s)

    @staticmethod
    def _shut(sock: Any) -> None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv() in the agent's thread


class _WatchedHTTP(http.client.HTTPConnection):
    def __init__(self, *args: Any, watchdog: _Watchdog, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._watchdog = watchdog

    def connect(self) -> None:
        super().connect()
        self._watchdog.add(self.sock)


class _WatchedHTTPS(http.client.HTTPSConnection):
    def __init__(self, *args: Any, watchdog: _Watchdog, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._watchdog = watchdog

    def connect(self) -> None:
        super().connect()
        self._watchdog.add(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self._watchdog = watchdog

    def http_open(self, req: Any) -> Any:
        return self.do_open(functools.partial(_WatchedHTTP, watchdog=self._watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self._watchdog = watchdog

    def https_open(self, req: Any) -> Any:
        return self.do_open(
            functools.partial(_WatchedHTTPS, watchdog=self._watchdog),
            req,
            context=self._context,  # type: ignore[attr-defined]
        )


@contextmanager
def _opener(deadline: Deadline, url: str) -> Iterator[urllib.request.OpenerDirector]:
    """An opener whose connections are shut down at ``deadline``; a request that ends with an
    error after the deadline passed raises the deadline's :class:`UpdateError` instead."""
    if deadline.expired():
        raise deadline.error(url)
    dog = _Watchdog(deadline)
    dog._timer.start()
    try:
        yield urllib.request.build_opener(_HTTPHandler(dog), _HTTPSHandler(dog))
    except UpdateError:
        raise
    except Exception:
        if dog.fired or deadline.expired():
            raise deadline.error(url) from None
        raise
    finally:
        dog._timer.cancel()
    if dog.fired:
        raise deadline.error(url)


def _per_read(timeout: float, deadline: Deadline) -> float:
    return max(min(timeout, deadline.remaining()), 0.001)


def fetch(url: str, limit: int, timeout: float = 30.0, deadline: Deadline | None = None) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all (or by ``deadline``, if sooner); refuse
    bodies over ``limit`` bytes.

    Raises:
        UpdateError: HTTP error, network error, deadline passed, or a body that is too large.
    """
    deadline = (deadline or Deadline(timeout, "request")).within(timeout, "request")
    req = urllib.request.Request(
        url, headers={"User-Agent": USER_AGENT, "Cache-Control": "no-cache"}
    )
    try:
        with (
            _opener(deadline, url) as opener,
            opener.open(req, timeout=_per_read(timeout, deadline)) as resp,
        ):
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
    """POST a JSON body within ``timeout`` seconds in all; returns the HTTP status (raises
    nothing for HTTP errors).

    Raises:
        UpdateError: the deadline passed.
        OSError: a network error.
    """
    deadline = Deadline(timeout, "status report")
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
    )
    try:
        with (
            _opener(deadline, url) as opener,
            opener.open(req, timeout=_per_read(timeout, deadline)) as resp,
        ):
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
    deadline: Deadline | None = None,
    min_rate: float = 0.0,
) -> Path:
    """Download ``url`` to ``part`` (resuming what is there), check it, and rename it to ``.tar``.

    Args:
        url: the bundle URL.
        part: the partial file (``<sha256>.part``); kept across failures so the next try resumes.
        size, sha256: what the signed channel promised.
        retries: reconnects after a dropped or failed connection.
        backoff_s: first wait between reconnects (doubles each time).
        timeout: seconds for one network operation (connect, one read).
        on_bytes: called with the total bytes on disk after each chunk (progress, fault tests).
        deadline: when the whole download, retries and waits included, must be over.
        min_rate: bytes/s a connection must deliver, averaged over ``timeout`` seconds; a
            slower one is dropped and resumed (0: no minimum).

    Returns:
        The verified file (``part`` with suffix ``.tar``).

    Raises:
        UpdateError: still incomplete after ``retries`` or at the deadline (the partial file is
            kept for the next try), more bytes than promised, or a SHA-256 mismatch (the partial file is deleted then, so the next try starts clean).
        OSError: the disk is full or unwritable (the caller cleans up).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    final = part.with_suffix(".tar")
    deadline = deadline or Deadline(3600.0, "download")
    last_error = ""
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            break
        if attempt:
            pause = min(backoff_s * 2 ** (attempt - 1), 30.0)
            if pause >= deadline.remaining():
                raise _incomplete(url, have, size, deadline.error(url).message)
            time.sleep(pause)
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with (
                _opener(deadline, url) as opener,
                opener.open(
                    urllib.request.Request(url, headers=headers),
                    timeout=_per_read(timeout, deadline),
                ) as resp,
            ):
                if have and resp.status == 200:
                    log.info("server ignored the Range request; starting %s again", url)
                    have = 0
                elif have and _content_range_start(resp.headers.get("Content-Range")) != have:
                    raise UpdateError(
                        f"GET {url}: the server resumed at the wrong offset",
                        hint="the server's Range support is broken",
                    )
                rate = _Rate(min_rate, timeout)
                with open(part, "ab" if have else "wb") as f:
                    while have < size:
                        # read1: return what arrived, so the rate check runs on a trickle too
                        block = resp.read1(min(CHUNK, size - have))
                        if not block:
                            break
                        f.write(block)
                        have += len(block)
                        if on_bytes:
                            on_bytes(have)
                        rate.check(len(block), url)
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
        except _TooSlow as exc:
            last_error = str(exc)
            log.info("download of %s dropped at byte %d: %s", url, have, last_error)
        except UpdateError as exc:
            if deadline.expired():
                have = part.stat().st_size if part.exists() else 0
                raise _incomplete(url, have, size, exc.message) from None
            raise
        except _NETWORK_ERRORS as exc:
            last_error = str(exc) or type(exc).__name__
            log.info("download of %s interrupted at byte %d: %s", url, have, last_error)
    have = part.stat().st_size if part.exists() else 0
    if have != size:
        raise _incomplete(url, have, size, last_error or "connection closed early")
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


def _incomplete(url: str, have: int, size: int, why: str) -> UpdateError:
    return UpdateError(
        f"GET {url}: got {have} of {size} bytes ({why})",
        hint="the download resumes at the next check",
    )


class _TooSlow(Exception):
    pass


class _Rate:
    """Drops a connection that delivers less than ``min_rate`` bytes/s over ``window`` seconds."""

    def __init__(self, min_rate: float, window: float) -> None:
        self.min_rate, self.window = min_rate, max(window, 0.001)
        self.start, self.bytes = time.monotonic(), 0

    def check(self, n: int, url: str) -> None:
        if self.min_rate <= 0:
            return
        self.bytes += n
        elapsed = time.monotonic() - self.start
        if elapsed >= self.window:
            if self.bytes < self.min_rate * elapsed:
                raise _TooSlow(
                    f"{self.bytes / elapsed:.0f} bytes/s over {elapsed:.0f} s, under the minimum "
                    f"of {self.min_rate:g}"
                )
            self.start, self.bytes = time.monotonic(), 0
