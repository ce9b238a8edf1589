"""Where shard bytes come from: local paths, ``http(s)://`` URLs, fsspec URLs (``s3://``,
``gs://``, ...) and ``pipe:CMD`` commands.

Discovery (sizes.json, img2dataset stats) and the workers' tar streams both read through
this module, so they fail alike:

* ``http(s)`` uses the standard library (urllib: redirects, ``*_proxy`` variables), streamed,
  with ``data.remote.timeout`` on the connection and on every read. (fsspec's HTTP
  filesystem would need aiohttp, which orbitclip does not depend on.)
* Any other ``proto://`` goes through fsspec. Its backends are optional packages (s3fs,
  gcsfs, ...); a missing one is a one-line :class:`StorageError` naming the package.
  Credentials, endpoints and read timeouts are the backend's own settings (environment,
  ``~/.aws``, or fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables).
* ``pipe:CMD`` runs CMD in a shell; its stdout is the tar and a nonzero exit status is a
  failure.

Opening is retried with backoff on transient failures. A stream that has delivered bytes is
never re-opened, since a re-read from the start would silently change which samples the
stream yields; if it breaks, :class:`ShardReader` records why (``lost``) so that the loader
counts the samples it did not get.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import subprocess
import time
import urllib.error
import urllib.request
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

from train.core.config import RemoteConfig
from train.core.errors import UserError

log = logging.getLogger(__name__)

Kind = Literal["local", "http", "fsspec", "pipe"]
T = TypeVar("T")

FIRST_READ = 512
"""Bytes asked for while opening (one tar block): a stream whose first bytes arrived counts as
open and is no longer retried; nothing has been handed to the tar reader before that."""
CHUNK = 1 << 20
"""Read size of :meth:`ShardReader.read` without a size."""
BACKEND_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
                    "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
"""The pip package that gives fsspec each common protocol (named in the error when missing)."""
RETRY_HTTP = frozenset({408, 425, 429})
"""HTTP client-error codes that are worth retrying (timeouts, rate limits); 5xx are too."""


class StorageError(UserError, OSError):
    """A location cannot be read (after retries); the message names it and says why."""


class NotFound(StorageError):
    """The location does not exist (no such file or object, HTTP 404/410)."""


class Denied(StorageError):
    """The server answered but refused (HTTP 4xx other than 404/410, permission denied)."""


class StreamLost(OSError):
    """A shard stream broke after it delivered data (dropped connection, stalled read, failed command)."""


# -- locations -----------------------------------------------------------------------------

def location_kind(url: str) -> Kind:
    """How ``url`` is read: a local path (or ``file://``), http(s), a pipe command, or fsspec."""
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive, not a protocol
        return "local"
    return "fsspec"


def local_path(url: str) -> str:
    """The file system path of a local location (``file://`` URLs unwrapped)."""
    return url2pathname(urlsplit(url).path) if url.startswith("file:") else url


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local path or a URL."""
    if location_kind(folder) == "local":
        return str(Path(folder) / name)
    return folder.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The folder holding a file (local path or URL)."""
    if location_kind(url) == "local":
        return str(Path(url).parent)
    return url.rsplit("/", 1)[0]


def file_name(url: str) -> str:
    """The last path component (``train-000000.tar``), without a URL's query string."""
    if location_kind(url) == "local":
        return Path(url).name
    return urlsplit(url).path.rsplit("/", 1)[-1]


# -- errors and retries ----------------------------------------------------------------------

def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    text = str(e)
    if isinstance(e, OSError) and text:  # its message says it ("timed out", "[Errno 104] ...")
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _transient(e: BaseException) -> bool:
    """Whether opening again could work (the network or server, not the address, failed)."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in RETRY_HTTP or e.code >= 500
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    # URLError: refused/reset connection, DNS failure; plus timeouts and broken HTTP exchanges.
    return isinstance(e, (OSError, HTTPException))


def _storage_error(url: str, e: BaseException, tries: int) -> StorageError:
    reason = _reason(e)
    if isinstance(e, FileNotFoundError) or (isinstance(e, urllib.error.HTTPError) and e.code in (404, 410)):
        return NotFound(f"{url} does not exist ({reason})")
    if isinstance(e, PermissionError) or isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500:
        return Denied(f"cannot read {url}: {reason}")
    after = f" (after {tries} tries)" if tries > 1 else ""
    return StorageError(f"cannot read {url}: {reason}{after}")


def with_retries(url: str, opts: RemoteConfig, attempt: Callable[[], T]) -> T:
    """``attempt()``, retried with doubling waits on transient failures.

    Raises:
        StorageError: (or :class:`NotFound` / :class:`Denied`) when it fails for good.
    """
    for k in itertools.count():
        try:
            return attempt()
        except StorageError:
            raise
        except Exception as e:  # every failure is classified; none escapes unnamed
            if not _transient(e) or k >= opts.retries:
                raise _storage_error(url, e, k + 1) from e
            wait = opts.retry_wait * 2**k
            log.warning("cannot open %s (%s); retry %d of %d in %.1f s", url, _reason(e), k + 1, opts.retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# -- backends --------------------------------------------------------------------------------

def _http_open(url: str, opts: RemoteConfig, method: str = "GET") -> HTTPResponse:
    request = urllib.request.Request(url, method=method, headers={"User-Agent": "orbitclip"})
    return urllib.request.urlopen(request, timeout=opts.timeout)


def fsspec_fs(url: str) -> tuple[Any, str]:
    """fsspec's file system and path for ``url``.

    Raises:
        StorageError: fsspec or the protocol's backend package is not installed, or the
            protocol is unknown.
    """
    scheme = urlsplit(url).scheme
    try:
        import fsspec
    except ImportError as e:
        raise StorageError(f"cannot read {url}: {scheme}:// URLs need fsspec (pip install fsspec)") from e
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package = BACKEND_PACKAGES.get(scheme)
        hint = f"pip install {package}" if package else str(e)
        raise StorageError(f"cannot read {url}: {scheme}:// needs the {package or 'fsspec backend'} "
                           f"package ({hint})") from e
    except ValueError as e:  # "Protocol not known: foo"
        raise StorageError(f"cannot read {url}: unknown URL scheme {scheme!r} ({e})") from e


class _Body(Protocol):
    def read(self, n: int) -> bytes: ...

    def end(self, received: int) -> None:
        """Raise if the stream ended early (shorter than announced, or the command failed)."""

    def close(self) -> None: ...


class _FileBody:
    """A local file or an fsspec file; ``size`` (fsspec) tells a short read from the end."""

    def __init__(self, f: Any, size: int | None = None) -> None:
        self.f, self.size = f, size

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def end(self, received: int) -> None:
        if self.size is not None and received < self.size:
            raise OSError(f"stream ended before the announced {self.size} bytes")

    def close(self) -> None:
        self.f.close()


class _HttpBody:
    """An HTTP response body. http.client does not raise when a connection closes before
    Content-Length bytes (``read(n)`` just returns ``b""``), so :meth:`end` checks the count."""

    def __init__(self, response: HTTPResponse) -> None:
        self.response, self.size = response, response.length

    def read(self, n: int) -> bytes:
        return self.response.read1(n)  # what has arrived (one system call): a stall loses nothing received

    def end(self, received: int) -> None:
        if self.size is not None and received < self.size:
            raise ConnectionError(f"connection closed before the announced {self.size} bytes")

    def close(self) -> None:
        self.response.close()


class _PipeBody:
    """stdout of a shell command, with a stall timeout on every read."""

    def __init__(self, command: str, timeout: float) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, bufsize=0)

    def read(self, n: int) -> bytes:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            raise TimeoutError(f"no output from the command for {self.timeout:g} s")
        return os.read(fd, n)

    def end(self, received: int) -> None:
        try:
            status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the command did not exit {self.timeout:g} s after its output ended") from None
        if status != 0:
            raise OSError(f"the command exited with status {status}")

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:  # left early: the rest of its output is not wanted
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _open_body(url: str, opts: RemoteConfig) -> _Body:
    kind = location_kind(url)
    if kind == "local":
        return _FileBody(open(local_path(url), "rb"))
    if kind == "http":
        return _HttpBody(_http_open(url, opts))
    if kind == "pipe":
        return _PipeBody(url[len("pipe:"):], opts.timeout)
    fs, path = fsspec_fs(url)
    f = fs.open(path, "rb")
    return _FileBody(f, getattr(f, "size", None))


def _close_quietly(body: _Body) -> None:
    try:
        body.close()
    except Exception as e:  # closing a broken stream may fail again; the failure is already known
        log.debug("closing a shard stream: %s", e)


# -- reading ---------------------------------------------------------------------------------

class ShardReader:
    """One shard's bytes front to back, as a file object for ``tarfile``.

    A read that fails, or an end before the announced length or with a failed command, sets
    :attr:`lost` (why) and raises :class:`StreamLost` once; later reads return ``b""`` so the
    tar reader stops instead of failing again for every remaining member.
    """

    def __init__(self, url: str, body: _Body, first: bytes, ended: bool) -> None:
        self.url = url
        self._body, self._pending, self._ended = body, first, ended
        self.received = len(first)
        """Bytes received from the source so far."""
        self.lost: str | None = None
        """Why the stream broke (``None`` while it is whole)."""

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left for ``n < 0``); ``b""`` at the end or after a loss."""
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        if self._pending:
            out, self._pending = self._pending[:n], self._pending[n:]
            return out
        if self.lost or self._ended:
            return b""
        try:
            data = self._body.read(n)
            if not data:
                self._body.end(self.received)
                self._ended = True
        except Exception as e:  # whatever broke a started stream, its samples are lost, not retried
            self.lost = _reason(e)
            raise StreamLost(f"{self.url}: {self.lost} (after {self.received} bytes)") from e
        self.received += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Release the connection, file or command."""
        _close_quietly(self._body)

    def __repr__(self) -> str:
        return f"<ShardReader {self.url}>"


def open_shard(url: str, opts: RemoteConfig) -> ShardReader:
    """Open a tar for streaming; retried (see :func:`with_retries`) until it delivers its first bytes.

    Raises:
        StorageError: It cannot be opened (:class:`NotFound`, :class:`Denied`, or failures
            that outlasted the retries).
    """
    def attempt() -> ShardReader:
        body = _open_body(url, opts)
        try:
            first = body.read(FIRST_READ)
            if not first:
                body.end(0)
        except BaseException:
            _close_quietly(body)
            raise
        return ShardReader(url, body, first, ended=not first)

    return with_retries(url, opts, attempt)


def read_bytes(url: str, opts: RemoteConfig) -> bytes:
    """The whole content of a small file (sizes.json, img2dataset stats), retried like :func:`open_shard`.

    Raises:
        StorageError: :class:`NotFound` if it does not exist, else why it cannot be read.
    """
    kind = location_kind(url)
    if kind == "pipe":
        raise StorageError(f"{url}: a sizes or stats file cannot be a pipe: command; give a path or URL")

    def attempt() -> bytes:
        if kind == "local":
            return Path(local_path(url)).read_bytes()
        if kind == "http":
            with _http_open(url, opts) as response:
                return response.read()  # read() without a size raises IncompleteRead if cut short
        fs, path = fsspec_fs(url)
        return fs.cat_file(path)

    return with_retries(url, opts, attempt)


def exists(url: str, opts: RemoteConfig) -> bool | None:
    """Whether a file exists: ``None`` when that cannot be told cheaply (a pipe, a server that
    refuses HEAD or is unreachable; the read will then retry and count)."""
    kind = location_kind(url)
    if kind == "local":
        return Path(local_path(url)).is_file()
    try:
        if kind == "http":
            with _http_open(url, opts, method="HEAD"):
                return True
        if kind == "fsspec":
            fs, path = fsspec_fs(url)
            return bool(fs.isfile(path))
    except urllib.error.HTTPError as e:
        return False if e.code in (404, 410) else None
    except StorageError:
        raise
    except Exception as e:  # a spot check only: the read itself will retry and count
        log.debug("cannot check %s: %s", url, e)
    return None


def is_dir(url: str) -> bool:
    """Whether ``url`` is a folder that can be listed (local or fsspec; http(s) cannot be listed)."""
    kind = location_kind(url)
    if kind == "local":
        return Path(local_path(url)).is_dir()
    if kind == "fsspec":
        fs, path = fsspec_fs(url)
        return bool(fs.isdir(path))
    return False


def list_tars(folder: str) -> list[str] | None:
    """The ``*.tar`` files directly in ``folder``, sorted; ``None`` if it cannot be listed (http(s), pipe)."""
    kind = location_kind(folder)
    if kind == "local":
        return sorted(str(p) for p in Path(local_path(folder)).glob("*.tar"))
    if kind == "fsspec":
        fs, path = fsspec_fs(folder)
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
    return None
