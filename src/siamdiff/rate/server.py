"""The rating web app (Flask): one image at a time, each answer committed before the next.

Run as ``python -m siamdiff.rate.server STUDY_DIR [--host H] [--port P]``; the CLI calls
:func:`serve`.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import re
import socket
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, redirect, render_template, request
from jinja2 import DictLoader
from werkzeug.exceptions import HTTPException
from werkzeug.serving import get_sockaddr, select_address_family

from siamdiff.errors import SiamdiffError
from siamdiff.rate import storage
from siamdiff.rate.pages import SCRIPT, TEMPLATES
from siamdiff.rate.storage import Rater
from siamdiff.rate.study import SOURCES, Study, check_images, load_study

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_NAME = 80
CODE_PATTERN = re.compile(rf"[{storage.CODE_ALPHABET}]{{{storage.CODE_LENGTH}}}")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it a browser sends "Origin: null" with the study's own forms,
    # and the origin check below could no longer tell them from another site's.
    "Referrer-Policy": "same-origin",
    # The browser's back button must not show a stale form for an answered image.
    "Cache-Control": "no-store",
}


def loopback_names(host: str) -> list[str] | None:
    """The Host headers a study served on ``host`` answers: for a loopback address only the
    machine's own names, so a web page whose DNS name is rebound to 127.0.0.1 cannot read a
    rater's page and answer for them; None (any) when served to the network."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    names = {"localhost", "127.0.0.1", f"[{host}]" if ":" in host else host}
    return sorted(names) if loopback else None


def create_app(study_root: str | Path, trusted_hosts: list[str] | None = None) -> Flask:
    """The Flask app for the study at ``study_root`` (its database is created if absent);
    ``trusted_hosts``: the Host headers answered (None: any)."""
    study = load_study(study_root)
    check_images(study)
    try:
        storage.init_db(study.root)
    except sqlite3.Error as exc:
        raise SiamdiffError(
            f"cannot open the ratings ({exc})", study.root / storage.DB_FILE
        ) from exc
    app = Flask(__name__)
    app.jinja_loader = DictLoader(TEMPLATES)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    app.config["TRUSTED_HOSTS"] = trusted_hosts
    total = len(study.sequence)

    def db() -> sqlite3.Connection:
        if "db" not in g:
            g.db = storage.connect(study.root)
        return g.db

    @app.teardown_appcontext
    def close_db(_exc: BaseException | None) -> None:
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    @app.before_request
    def same_origin_posts_only() -> None:
        # Another web site's form posting here (a browser names it in Origin) could enrol
        # raters or answer for one: only the study's own pages may post.
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin and urlsplit(origin).netloc != request.host:
            abort(403, description="Answers are only accepted from the study's own pages.")

    @app.after_request
    def secure(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.errorhandler(HTTPException)
    def error_page(exc: HTTPException) -> tuple[str, int]:
        return render_template(
            "error.html", status=exc.code, message=exc.description
        ), exc.code or 500

    def order(rater: Rater) -> list[int]:
        return storage.rater_order(db(), rater, study.order)

    def rater_or_404(code: str) -> Rater:
        rater = storage.find_rater(db(), code) if CODE_PATTERN.fullmatch(code) else None
        if rater is None:
            abort(404, description=f"Unknown rater code {code[:16]!r}.")
        return rater

    @app.get("/")
    def start() -> str:
        return render_template("start.html", total=total, error=None)

    @app.post("/start")
    def begin() -> Response:
        name = " ".join(request.form.get("name", "").split())
        if not name or len(name) > MAX_NAME:
            abort(400, description=f"Enter a name of 1 to {MAX_NAME} characters.")
        rater = storage.create_rater(db(), name, study.order)
        return redirect(f"/rate/{rater.code}", code=303)

    @app.post("/resume")
    def resume() -> Response:
        code = request.form.get("code", "").strip().upper()
        return redirect(f"/rate/{rater_or_404(code).code}", code=303)

    @app.get("/rate/<code>")
    def show(code: str) -> str:
        rater = rater_or_404(code)
        position = storage.next_position(db(), rater)
        if position >= total:
            return render_template("done.html", rater=rater, total=total)
        item_index = order(rater)[position]
        item = study.items[item_index]
        return render_template(
            "rate.html",
            rater=rater,
            position=position,
            total=total,
            percent=round(100 * position / total),
            image=item.name,
            overlay=item.overlay,
            token=study.position_token(rater.id, position, item_index),
        )

    @app.post("/rate/<code>")
    def answer(code: str) -> Response:
        rater = rater_or_404(code)
        rater_items = order(rater)
        position, score, guess = _parse_answer(study, rater, rater_items)
        try:
            storage.record_answer(db(), rater, position, rater_items[position], score, guess)
        except storage.PositionTaken:
            abort(409, description=f"Image {position + 1} was already answered.")
        except storage.WrongPosition:
            abort(409, description=f"Image {position + 1} is not the current image.")
        return redirect(f"/rate/{rater.code}", code=303)

    @app.get("/image/<name>")
    def image(name: str) -> Response:
        # Only names listed in the study resolve: the URL never becomes a path.
        item = study.by_name.get(name)
        overlay = request.args.get("overlay") == "1"
        if item is None or (overlay and not item.overlay):
            abort(404, description="No such image.")
        # The bytes alone: send_file's ETag and Last-Modified carry the file's write time,
        # and the gaps between them (decoding a real frame is slower) would tell the sources.
        return Response(study.image_path(item.name, overlay).read_bytes(), mimetype="image/png")

    @app.get("/static/rate.js")
    def script() -> Response:
        return Response(SCRIPT, mimetype="text/javascript")

    return app


def _parse_answer(study: Study, rater: Rater, items: list[int]) -> tuple[int, int, str | None]:
    """Validate a submitted form; abort with 400/403 on anything malformed or forged."""
    form = request.form
    try:
        position = int(form.get("position", ""))
        score = int(form.get("score", ""))
    except ValueError:
        abort(400, description="The answer lacks a position or a score.")
    if not 1 <= score <= 5:
        abort(400, description=f"Score {score} is outside 1-5.")
    if not 0 <= position < len(study.sequence):
        abort(400, description=f"Position {position} is not in this study.")
    expected = study.position_token(rater.id, position, items[position])
    # Bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    if not hmac.compare_digest(form.get("token", "").encode(), expected.encode()):
        abort(403, description="The answer's token does not match this rater and image.")
    guess = form.get("guess") or None
    if guess is not None and guess not in SOURCES:
        abort(400, description=f"Guess must be 'real' or 'synthetic', got {guess[:20]!r}.")
    return position, score, guess


def check_can_listen(host: str, port: int) -> None:
    """Werkzeug reports a busy port on two lines and exits the process; find out first."""
    if not 1 <= port <= 65535:  # the OS would take 70000 as 70000 % 65536
        raise SiamdiffError(f"--port must be in 1..65535, got {port}")
    if not host.strip():  # it binds to loopback, yet would answer any Host header
        raise SiamdiffError("--host is empty: name an address (127.0.0.1 for this machine)")
    try:
        # The address family and address werkzeug will bind ("localhost" is IPv4 there).
        family = select_address_family(host, port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug does
            probe.bind(get_sockaddr(host, port, family))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SiamdiffError(f"cannot listen on {host}:{port} ({reason})") from exc


def serve(study_root: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the study until interrupted (threaded: several raters at once)."""
    check_can_listen(host, port)
    app = create_app(study_root, trusted_hosts=loopback_names(host))
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    print(f"Rating study {study_root}: open http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
    app.run(host=host, port=port, threaded=True, debug=False, use_reloader=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m siamdiff.rate.server")
    parser.add_argument("study", type=Path)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    try:
        serve(args.study, args.host, args.port)
    except SiamdiffError as exc:
        parser.exit(2, f"siamdiff: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
