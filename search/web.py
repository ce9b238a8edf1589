"""``search serve``: a small local web page over an index (Flask, served by werkzeug).

The page (``page.html``) has a text box and an image upload; results come back as a grid
with scores and captions, and a click on a result asks for the images most similar to it.
JSON endpoints: ``/api/info``, ``/api/text?q=``, ``/api/image`` (POST, multipart ``image``),
``/api/key?key=``; images are served from their shards by row at ``/img/<row>``.
"""

from __future__ import annotations

import errno
import io
import socket
from importlib import resources
from typing import Any

from flask import Flask, Response, jsonify, request
from PIL import Image
from werkzeug.serving import BaseWSGIServer, make_server

from search.embed import decode_image
from search.errors import SearchError
from search.options import ServeOptions
from search.query import Hit, Searcher
from search.store import SearchIndex

MAX_UPLOAD = 32 * 2**20


def _payload(hits: list[Hit], query: dict[str, Any]) -> dict[str, Any]:
    return {"query": query, "results": [{**h.to_dict(), "image": f"/img/{h.row}"} for h in hits]}


def _k(default: int) -> int:
    try:
        k = int(request.values.get("k", default))
    except ValueError:
        raise SearchError("k must be a whole number") from None
    if k < 1:
        raise SearchError("k must be >= 1")
    return min(k, 200)


def create_app(searcher: Searcher, k: int = 12) -> Flask:
    """The Flask app answering queries with ``searcher``."""
    app = Flask("search")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD
    index: SearchIndex = searcher.index
    page = resources.files("search").joinpath("page.html").read_text(encoding="utf-8")

    @app.errorhandler(SearchError)
    def _bad_request(e: SearchError) -> tuple[Response, int]:
        return jsonify(error=str(e)), 400

    @app.errorhandler(413)
    def _too_large(_e: Exception) -> tuple[Response, int]:
        return jsonify(error=f"upload larger than {MAX_UPLOAD // 2**20} MiB"), 413

    @app.get("/")
    def home() -> Response:
        return Response(page, mimetype="text/html")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status=204)  # browsers ask for one; an empty answer keeps the log clean

    @app.get("/api/info")
    def info() -> Response:
        m = index.meta
        return jsonify(count=m["count"], model=m["model"]["spec"], arch=m["model"]["arch"],
                       index=m["index"]["kind"], recall=m.get("recall@10"), k=k)

    @app.get("/api/text")
    def by_text() -> Response:
        q = request.args.get("q", "")
        return jsonify(_payload(searcher.by_text(q, _k(k)), {"text": q}))

    @app.get("/api/key")
    def by_key() -> Response:
        key = request.args.get("key", "")
        return jsonify(_payload(searcher.by_key(key, _k(k)), {"key": key}))

    @app.post("/api/image")
    def by_image() -> Response:
        upload = request.files.get("image")
        if upload is None or not upload.filename:
            raise SearchError("no image uploaded (form field 'image')")
        data = upload.read()
        if not data:
            raise SearchError(f"uploaded file {upload.filename} is empty")
        image: Image.Image = decode_image(data, f"uploaded file {upload.filename}")
        return jsonify(_payload(searcher.by_image(image, _k(k)), {"image": upload.filename}))

    @app.get("/img/<int:row>")
    def image(row: int) -> Response:
        if not 0 <= row < len(index):
            raise SearchError(f"no row {row} in this index")
        data = index.image_bytes(row)
        fmt = (Image.open(io.BytesIO(data)).format or "JPEG").lower()
        resp = Response(data, mimetype=f"image/{fmt}")
        resp.headers["Cache-Control"] = "max-age=3600"
        return resp

    return app


def make_app_server(opts: ServeOptions) -> tuple[BaseWSGIServer, str]:
    """The bound (not yet serving) HTTP server and its URL.

    The model is loaded and checked against the index before binding, so a mismatch is
    reported at start, not on the first query.

    Raises:
        SearchError: bad index, model mismatch, or the port is in use.
    """
    opts.validate()
    searcher = Searcher(SearchIndex(opts.index), opts.model, opts.device)
    searcher.encoder  # noqa: B018 -- load + identity check now
    app = create_app(searcher, opts.k)
    _check_port(opts.host, opts.port)
    try:
        server = make_server(opts.host, opts.port, app, threaded=True)
    except (OSError, SystemExit) as e:  # werkzeug prints and exits on some bind errors
        raise SearchError(f"cannot listen on {opts.host}:{opts.port}: {getattr(e, 'strerror', None) or e}") from None
    return server, f"http://{opts.host}:{server.server_port}/"


def _check_port(host: str, port: int) -> None:
    # werkzeug answers a busy port with three lines of its own and sys.exit; try the bind first
    # (with SO_REUSEADDR, as werkzeug binds, so a port in TIME_WAIT is not called busy)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SearchError(f"port {port} on {host} is in use; pick another with --port") from None
            raise SearchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
