"""HTTP behaviour of the rating app: blinding, ordering, replay/forgery, injection, paths."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
from flask.testing import FlaskClient

from siamdiff.errors import SiamdiffError
from siamdiff.rate.export import export_results
from siamdiff.rate.server import create_app, loopback_names, serve
from siamdiff.rate.storage import all_answers, connect, find_rater, rater_order
from siamdiff.rate.study import Study


@pytest.fixture
def client(study: Study) -> FlaskClient:
    return create_app(study.root).test_client()


def begin(client: FlaskClient, name: str = "Dr Who") -> str:
    response = client.post("/start", data={"name": name})
    assert response.status_code == 303
    return response.headers["Location"].rsplit("/", 1)[1]


def order_of(study: Study, code: str) -> list[int]:
    """The item indices in the order the rater with ``code`` sees them (as stored)."""
    conn = connect(study.root)
    try:
        return rater_order(conn, find_rater(conn, code), study.order)
    finally:
        conn.close()


def current_form(client: FlaskClient, code: str) -> dict[str, str]:
    page = client.get(f"/rate/{code}").get_data(as_text=True)
    fields = dict(re.findall(r'name="(position|token)" value="([^"]*)"', page))
    fields["image"] = re.search(r'src="/image/([0-9a-f]+)"', page).group(1)
    return fields


def answer(client: FlaskClient, code: str, score: int, guess: str = "") -> int:
    form = current_form(client, code)
    data = {"position": form["position"], "token": form["token"], "score": str(score)}
    if guess:
        data["guess"] = guess
    return client.post(f"/rate/{code}", data=data).status_code


def test_full_rating_round_trip(client: FlaskClient, study: Study) -> None:
    code = begin(client)
    shown = []
    for position in range(len(study.sequence)):
        form = current_form(client, code)
        assert form["position"] == str(position)
        shown.append(form["image"])
        assert client.get(f"/image/{form['image']}").status_code == 200
        assert answer(client, code, 1 + position % 5, "real") == 303
    assert shown == [study.items[i].name for i in order_of(study, code)]
    assert "Thank you" in client.get(f"/rate/{code}").get_data(as_text=True)
    answers = all_answers(study.root)
    assert [a.score for a in answers] == [1 + p % 5 for p in range(len(study.sequence))]
    summary = export_results(study.root)
    assert summary["answers"] == len(study.sequence)
    assert {p.name for p in study.root.iterdir()} >= {"mos.json", "mos.csv", "mos.png"}


def test_page_never_reveals_the_source(client: FlaskClient, study: Study) -> None:
    code = begin(client)
    skeletons: dict[str, set[str]] = {}
    for index in order_of(study, code):
        item = study.items[index]
        page = client.get(f"/rate/{code}").get_data(as_text=True)
        assert item.record_id not in page
        form = current_form(client, code)
        assert form["image"] == item.name
        # Strip what legitimately changes; what is left must not depend on the source.
        for varying in (item.name, form["token"]):
            page = page.replace(varying, "")
        skeletons.setdefault(item.source, set()).add(re.sub(r"\d+", "#", page))
        assert answer(client, code, 3) == 303
    assert skeletons["real"] == skeletons["synthetic"]
    assert len(skeletons["real"]) == 1


def test_image_responses_carry_no_file_times(client: FlaskClient, study: Study) -> None:
    """An ETag or Last-Modified from the file's write time would time each image's making
    (a real frame's decoding is slower), readable in the browser's developer tools."""
    headers = set()
    for item in study.items:
        response = client.get(f"/image/{item.name}")
        assert response.get_data() == study.image_path(item.name).read_bytes()
        assert "ETag" not in response.headers and "Last-Modified" not in response.headers
        headers.add(tuple(sorted(name for name, _ in response.headers if name != "Content-Length")))
    assert len(headers) == 1


def test_a_study_given_by_a_relative_path_serves_its_images(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(study.root.parent)
    client = create_app(study.root.name).test_client()
    assert client.get(f"/image/{study.items[0].name}").status_code == 200


def test_replayed_forged_and_invalid_answers_are_rejected(
    client: FlaskClient, study: Study
) -> None:
    code = begin(client)
    form = current_form(client, code)
    good = {"position": form["position"], "token": form["token"], "score": "4"}
    assert client.post(f"/rate/{code}", data=good).status_code == 303
    replay = client.post(f"/rate/{code}", data=good)
    assert replay.status_code == 409 and "already answered" in replay.get_data(as_text=True)
    nxt = current_form(client, code)
    forged = {"position": nxt["position"], "token": "0" * 64, "score": "3"}
    assert client.post(f"/rate/{code}", data=forged).status_code == 403
    accented = {"position": nxt["position"], "token": "é" * 64, "score": "3"}
    assert client.post(f"/rate/{code}", data=accented).status_code == 403
    other = begin(client, "Other")  # another rater's token is a forgery too
    assert client.post(f"/rate/{other}", data={**nxt, "score": "3"}).status_code == 403
    for score in ("0", "6", "x", ""):
        data = {"position": nxt["position"], "token": nxt["token"], "score": score}
        assert client.post(f"/rate/{code}", data=data).status_code == 400
    bad_guess = {"position": nxt["position"], "token": nxt["token"], "score": "3", "guess": "x"}
    assert client.post(f"/rate/{code}", data=bad_guess).status_code == 400
    ahead = current_form(client, other)
    assert ahead["position"] == "0"
    assert len(all_answers(study.root)) == 1


def test_skipping_ahead_is_refused(client: FlaskClient, study: Study) -> None:
    code = begin(client)
    conn = connect(study.root)
    rater = find_rater(conn, code)
    conn.close()
    token = study.position_token(rater.id, 2, order_of(study, code)[2])  # not the current image
    response = client.post(f"/rate/{code}", data={"position": "2", "token": token, "score": "3"})
    assert response.status_code == 409 and "not the current image" in response.get_data(True)


def test_unknown_rater_code_is_a_clear_error(client: FlaskClient) -> None:
    response = client.post("/resume", data={"code": "ZZZZZZZZ"})
    assert response.status_code == 404
    assert "Unknown rater code" in response.get_data(as_text=True)
    assert client.get("/rate/<script>").status_code == 404
    code = begin(client)
    assert client.post("/resume", data={"code": code.lower()}).status_code == 303


def test_names_cannot_inject_html(client: FlaskClient) -> None:
    code = begin(client, '<script>alert("x")</script><img src=x onerror=alert(1)>')
    page = client.get(f"/rate/{code}").get_data(as_text=True)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert" in page
    assert client.post("/start", data={"name": "   "}).status_code == 400
    assert client.post("/start", data={"name": "x" * 81}).status_code == 400


def test_no_path_from_url_to_file(client: FlaskClient, study: Study) -> None:
    for url in (
        "/image/../study.json",
        "/image/..%2Fstudy.json",
        "/image/%2e%2e%2fsecret.key",
        "/study.json",
        "/secret.key",
        "/images/" + study.items[0].name + ".png",
        "/static/../secret.key",
        "/image/" + study.items[0].name + ".png",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert study.secret.hex() not in response.get_data(as_text=True)
    item = study.items[0]
    assert client.get(f"/image/{item.name}?overlay=1").status_code == 200


def test_security_headers(client: FlaskClient) -> None:
    response = client.get("/")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"


def test_each_rater_sees_an_order_of_their_own_on_every_visit(
    client: FlaskClient, study: Study
) -> None:
    """Order effects (fatigue, anchoring, where the repeats fall) must not land on the same
    images for everyone, and raters must not be able to compare notes by image number."""
    orders = [study.order(rater) for rater in range(1, 6)]
    assert len({tuple(order) for order in orders}) == 5
    for order in orders:
        assert len(order) == len(study.sequence)
        assert sorted(set(order)) == list(range(len(study.items)))
    first, second = begin(client, "A"), begin(client, "B")
    shown = {code: current_form(client, code)["image"] for code in (first, second)}
    assert current_form(client, first)["image"] == shown[first]  # a revisit: the same image
    for code in (first, second):
        assert shown[code] == study.items[order_of(study, code)[0]].name


def test_a_raters_order_is_the_one_stored_when_they_joined(
    client: FlaskClient, study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redrawn on every visit, another NumPy (a moved study, an upgrade) could reshuffle a
    rater's remaining images: some shown twice, some never."""
    code = begin(client)
    joined = order_of(study, code)
    assert joined == study.order(1)
    assert answer(client, code, 3) == 303
    monkeypatch.setattr(Study, "order", lambda self, rater_id: self.sequence[::-1])
    assert current_form(client, code)["image"] == study.items[joined[1]].name
    assert answer(client, code, 4) == 303
    assert [a.item for a in all_answers(study.root)] == joined[:2]
    # A rater of a database from before orders were stored: drawn once, then kept.
    conn = connect(study.root)
    conn.execute("DELETE FROM orders")
    conn.close()
    assert current_form(client, code)["image"] == study.items[study.sequence[::-1][2]].name
    monkeypatch.undo()
    assert order_of(study, code) == study.sequence[::-1]


def test_a_study_made_before_per_rater_orders_keeps_its_single_order(study: Study) -> None:
    settings = {k: v for k, v in study.info["settings"].items() if k != "order_per_rater"}
    older = replace(study, info={**study.info, "settings": settings})
    assert older.order(1) == older.order(2) == study.sequence


def test_other_sites_cannot_post_and_rebound_names_are_refused(study: Study) -> None:
    app = create_app(study.root, trusted_hosts=loopback_names("127.0.0.1"))
    client = app.test_client()
    here = {"base_url": "http://127.0.0.1:8765"}
    for origin in ("https://evil.example", "null"):
        response = client.post("/start", data={"name": "x"}, headers={"Origin": origin}, **here)
        assert response.status_code == 403
    own = client.post(
        "/start", data={"name": "x"}, headers={"Origin": "http://127.0.0.1:8765"}, **here
    )
    assert own.status_code == 303
    # A DNS name rebound to 127.0.0.1 reaches the server with its own Host header.
    assert client.get("/", base_url="http://rebound.example:8765").status_code == 400
    assert loopback_names("0.0.0.0") is None  # served to the network: any name


def test_a_double_submitted_answer_is_stored_once(study: Study) -> None:
    """Two simultaneous posts of one rater's current answer: one is stored, one refused."""
    app = create_app(study.root)
    code = begin(app.test_client())
    form = current_form(app.test_client(), code)
    data = {"position": form["position"], "token": form["token"], "score": "4"}
    statuses: list[int] = []
    start = threading.Barrier(2)

    def post() -> None:
        start.wait()
        statuses.append(app.test_client().post(f"/rate/{code}", data=data).status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [303, 409]
    assert [a.position for a in all_answers(study.root)] == [0]


def test_a_damaged_ratings_database_is_one_line(study: Study) -> None:
    (study.root / "ratings.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SiamdiffError, match=r"ratings.db: cannot open the ratings \(file is not"):
        create_app(study.root)
    with pytest.raises(SiamdiffError, match=r"ratings.db: cannot read the ratings \(file is not"):
        export_results(study.root)


@pytest.mark.parametrize("port", [0, -1, 70000])
def test_a_port_outside_the_range_is_refused(study: Study, port: int) -> None:
    with pytest.raises(SiamdiffError, match=rf"--port must be in 1..65535, got {port}"):
        serve(study.root, "127.0.0.1", port)


def test_concurrent_raters_do_not_collide(study: Study) -> None:
    app = create_app(study.root)
    errors: list[BaseException] = []

    def rate_all(name: str) -> None:
        try:
            client = app.test_client()
            code = begin(client, name)
            for _ in study.sequence:
                assert answer(client, code, 3) == 303
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=rate_all, args=(f"rater {i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    answers = all_answers(study.root)
    assert len(answers) == 3 * len(study.sequence)
    assert len({a.rater for a in answers}) == 3


def test_export_without_answers_is_a_clear_error(study: Study) -> None:
    with pytest.raises(SiamdiffError, match="no ratings yet"):
        export_results(study.root)
    create_app(study.root)
    with pytest.raises(SiamdiffError, match="no ratings yet"):
        export_results(study.root)


def test_a_busy_port_is_one_line_before_anything_is_served(study: Study) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SiamdiffError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(study.root, "127.0.0.1", port)
        # werkzeug binds "localhost" as IPv4 even where it resolves to ::1 first.
        with pytest.raises(SiamdiffError, match=f"cannot listen on localhost:{port}"):
            serve(study.root, "localhost", port)
    # Bound to loopback, it answered every Host header: no rebinding protection.
    with pytest.raises(SiamdiffError, match="--host is empty"):
        serve(study.root, "", 8765)


def test_the_server_module_runs_without_a_warning() -> None:
    """`python -m siamdiff.rate.server` (docs/rating.md): runpy warns when the package has
    already imported the module it is asked to run."""
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "siamdiff.rate.server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "RuntimeWarning" not in done.stderr, done.stderr
