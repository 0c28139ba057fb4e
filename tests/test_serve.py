"""`serve`: the page and JSON API over the demo's index, through FastAPI's test client and a live loopback
server: answers equal to `query`'s, the guardrail, every bad input, concurrency, --keep."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from idia_engine.cli.app import app as cli_app
from idia_engine.engine.query.run import QueryConfig, run_query
from idia_engine.engine.serve.server import bind, load
from idia_engine.engine.serve.settings import ServeSettings
from PIL import Image
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def demo(small_demo):
    work, _ = small_demo
    with open(work / "report" / "persons.csv", newline="", encoding="utf-8") as f:
        persons = {r["name"]: r for r in csv.DictReader(f)}
    member = next(n for n, r in persons.items() if r["label"] == "member" and int(r["score"]) >= 3)
    non_member = next(n for n, r in persons.items() if r["label"] == "non-member" and r["decision"] == "non-member")
    names = [n.strip() for n in (work / "names.txt").read_text(encoding="utf-8").splitlines()
             if n.strip() and not n.startswith("#")]
    return {"work": work, "persons": persons, "member": member, "non_member": non_member, "names": names}


@pytest.fixture(scope="module")
def settings(demo) -> ServeSettings:
    return ServeSettings(index_dir=demo["work"] / "index", reference=demo["work"] / "report", device="cpu")


@pytest.fixture(scope="module")
def loaded(settings):
    loaded = load(settings)
    yield loaded
    loaded.scorer.close()


@pytest.fixture(scope="module")
def client(loaded, settings):
    return TestClient(loaded.app(settings))


def _photos(demo, person: str, limit: int = 30) -> list[tuple[str, tuple[str, bytes, str]]]:
    folder = demo["work"] / "faces" / person.replace(" ", "_")
    return [("photos", (p.name, p.read_bytes(), "image/png")) for p in sorted(folder.iterdir())[:limit]]


def _png(width: int, height: int, stored: bool = False) -> bytes:
    """A plain PNG; `stored`: with zlib level 0 (its size is then its pixels', 3 bytes each)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buf, "PNG", compress_level=0 if stored else 6)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header says width x height: a decompression bomb (Pillow reads the header only
    to tell its size)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)  # a few rows of a stream that would go on
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _attack(client, name: str, files) -> dict:
    r = client.post("/api/attack", data={"name": name}, files=files)
    assert r.status_code == 200, r.text
    return r.json()


def test_member_and_non_member_answers_are_the_reports(client, demo):
    for person in (demo["member"], demo["non_member"]):
        row = demo["persons"][person]
        assert int(row["n_images"]) <= 30  # every photo the report voted with is sent
        a = _attack(client, person, _photos(demo, person))
        assert a["name_is"] == "index" and a["photos_used"] == int(row["n_images"])
        assert a["score"] == int(row["score"]) and a["decision"] == row["decision"]
        assert " ".join("1" if t["won"] else "0" for t in a["templates"]) == row["hits"]
        assert sum(t["votes_for_name"] for t in a["templates"]) == int(row["true_votes"])
        assert a["exact"]["all_top1_exact"] and a["exact"]["exact_by_index"] == a["photos_used"] * 21
        assert all(p["templates_won"] == sum(r == 1 for r in p["name_rank"]) for p in a["photos"])
    member = _attack(client, demo["member"], _photos(demo, demo["member"]))
    ref = member["reference"]["paper"]
    assert ref["members_at_or_above"]["n"] + ref["non_members_at_or_above"]["n"] == 60
    assert ref["members_at_or_above"]["low"] <= ref["members_at_or_above"]["value"] <= ref["members_at_or_above"]["high"]
    assert member["scores"]["calibrated"] == pytest.approx(member["scores"]["vote_share"]
                                                           - member["scores"]["reference_share"])


def test_a_name_outside_the_index_is_scored_beside_it_as_query_does(client, demo, tmp_path):
    stranger = "Quentin Zyxwortha"
    assert stranger not in demo["names"]
    files = _photos(demo, demo["member"], 6)
    a = _attack(client, stranger, files)
    assert a["name_is"] == "added" and a["scores"]["calibrated"] is None
    # query with the same photos filed under that name: the same votes
    faces = tmp_path / "faces" / stranger.replace(" ", "_")
    faces.mkdir(parents=True)
    for _, (filename, data, _) in files:
        (faces / filename).write_bytes(data)
    result = run_query(QueryConfig(index_dir=demo["work"] / "index", faces_dir=tmp_path / "faces",
                                   out_dir=tmp_path / "report", store_dir=tmp_path / "store", device="cpu"))
    with open(tmp_path / "report" / "persons.csv", newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert result.summary["candidates_added_for_this_run"] == [stranger]
    assert a["score"] == int(row["score"])
    assert " ".join("1" if t["won"] else "0" for t in a["templates"]) == row["hits"]


def test_a_name_spelt_otherwise_with_the_same_tokens_is_the_index_entry(client, demo):
    a = _attack(client, "  " + demo["member"].upper().replace(" ", "   ") + " ", _photos(demo, demo["member"], 5))
    assert a["name_is"] == "tokens"
    b = _attack(client, demo["member"], _photos(demo, demo["member"], 5))
    assert a["score"] == b["score"] and a["templates"] == b["templates"]


def _other_names_in(text: str, names: list[str], typed: str) -> list[str]:
    return [n for n in names if n != typed and n in text]


def test_without_auditor_no_response_names_anyone_but_the_typed_name(client, loaded, settings, demo):
    names = demo["names"]
    page = client.get("/").text + client.get("/api/info").text + client.get("/openapi.json").text
    assert _other_names_in(page, names, "") == []
    for typed, photos_of in ((demo["member"], demo["member"]), (demo["non_member"], demo["non_member"]),
                             ("Quentin Zyxwortha", demo["member"]), (demo["non_member"], demo["member"])):
        r = client.post("/api/attack", data={"name": typed}, files=_photos(demo, photos_of, 8))
        assert r.status_code == 200
        assert _other_names_in(r.text, names, typed) == [], typed
    # the same request to an auditor's server does name who the photos resemble: the check above can fail
    auditor = TestClient(loaded.app(replace(settings, auditor=True)))
    r = auditor.post("/api/attack", data={"name": demo["non_member"]}, files=_photos(demo, demo["member"], 8))
    assert demo["member"] in _other_names_in(r.text, names, demo["non_member"])


BAD_REQUESTS = {
    "no photo": (lambda d: ({"name": d["member"]}, None), 422, "no photo"),
    "empty file field": (lambda d: ({"name": d["member"]}, [("photos", ("", b"", "application/octet-stream"))]),
                         422, "no photo"),
    "too many photos": (lambda d: ({"name": d["member"]}, [("photos", (f"{i}.png", _png(8 + i, 8), "image/png"))
                                                           for i in range(31)]), 413, "more than 30 photos"),
    "not an image": (lambda d: ({"name": d["member"]}, [("photos", ("notes.txt", b"hello", "text/plain"))]),
                     422, "photo 1 (notes.txt) is not an image"),
    "empty image file": (lambda d: ({"name": d["member"]}, [("photos", ("a.png", b"", "image/png"))]), 422,
                         "photo 1 (a.png) is empty"),
    "decompression bomb": (lambda d: ({"name": d["member"]}, [("photos", ("bomb.png", _bomb_png(9000, 6000), "image/png"))]),
                           413, "9000 x 6000 = 54,000,000 pixels"),
    "bomb past Pillow's limit": (lambda d: ({"name": d["member"]}, [("photos", ("b.png", _bomb_png(10**5, 10**5),
                                                                                  "image/png"))]), 413, "bomb limit"),
    "upload over 50 MB": (lambda d: ({"name": d["member"]}, [("photos", ("big.png", b"\0" * (51 << 20), "image/png"))]),
                          413, "50 MB"),
    "no name": (lambda d: ({}, _photos(d, d["member"], 1)), 422, "no name"),
    "empty name": (lambda d: ({"name": "   "}, _photos(d, d["member"], 1)), 422, "no name"),
    "500-character name": (lambda d: ({"name": "A" * 500}, _photos(d, d["member"], 1)), 422, "at most 256 characters"),
    "control character": (lambda d: ({"name": "Ann\x07 Lee"}, _photos(d, d["member"], 1)), 422, "U+0007"),
    "line break": (lambda d: ({"name": "Ann\nLee"}, _photos(d, d["member"], 1)), 422, "U+000A"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_one_line_and_the_server_keeps_serving(client, demo, case):
    make, status, says = BAD_REQUESTS[case]
    data, files = make(demo)
    r = client.post("/api/attack", data=data, files=files)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error and "\n" not in error and "Traceback" not in r.text
    assert client.get("/api/health").json()["status"] == "ok"
    assert _attack(client, demo["member"], _photos(demo, demo["member"], 2))["photos_used"] == 2


def test_bodies_that_are_no_form_are_refused(client):
    r = client.post("/api/attack", content=b'{"name": "x"}', headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = client.post("/api/attack", content=b"--xyz\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code in (400, 422) and "\n" not in r.json()["error"]
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()


def test_duplicates_vote_once_and_the_upload_limit_is_configurable(loaded, settings, demo):
    small = TestClient(loaded.app(replace(settings, max_upload_mb=1, max_photos=3)))
    files = _photos(demo, demo["member"], 2)
    a = _attack(small, demo["member"], files + files[:1])
    assert a["photos_used"] == 2 and a["duplicates_skipped"] == [{"position": 2, "filename": files[0][1][0], "same_as": 0}]
    r = small.post("/api/attack", data={"name": "x y"}, files=[("photos", ("a.png", b"\0" * (2 << 20), "image/png"))])
    assert r.status_code == 413 and "1 MB" in r.json()["error"]


def test_photos_never_touch_the_disk_without_keep_and_are_kept_whole_with_it(loaded, settings, demo, tmp_path,
                                                                             monkeypatch):
    def no_temp_files(*args, **kwargs):
        raise AssertionError("a temporary file was made for an upload")

    client = TestClient(loaded.app(settings))
    big = _png(1400, 1000, stored=True)  # 4 MB: Starlette's own parser would spool it to a temporary file
    assert len(big) > 4 << 20 - 1
    with monkeypatch.context() as m:
        for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
            m.setattr(tempfile, name, no_temp_files)
        r = client.post("/api/attack", data={"name": demo["member"]},
                        files=_photos(demo, demo["member"], 2) + [("photos", ("big.png", big, "image/png"))])
    assert r.status_code == 200, r.text
    keep = tmp_path / "kept"
    keeper = TestClient(loaded.app(replace(settings, keep_dir=keep)))
    a = _attack(keeper, demo["member"], _photos(demo, demo["member"], 3))
    folder = keep / a["kept_in"]
    assert sorted(p.name for p in folder.iterdir()) == ["photo-01.png", "photo-02.png", "photo-03.png", "request.json"]
    assert json.loads((folder / "request.json").read_text())["answer"]["score"] == a["score"]
    assert not [p for p in keep.iterdir() if p.name.startswith(".")]


def test_concurrent_clients_on_a_live_loopback_server_get_the_sequential_answers(loaded, settings, demo):
    import httpx
    import uvicorn

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(loaded.app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # bounded wait for startup
            if server.started:
                break
            threading.Event().wait(0.05)
        people = [demo["member"], demo["non_member"]]
        files = {p: _photos(demo, p, 10) for p in people}

        def ask(i: int) -> tuple[str, dict]:
            person = people[i % 2]
            with httpx.Client(base_url=base, timeout=60) as c:
                r = c.post("/api/attack", data={"name": person}, files=files[person])
                assert r.status_code == 200, r.text
                return person, r.json()

        sequential = {p: ask(i)[1] for i, p in enumerate(people)}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(16)))
        for person, a in answers:
            want = sequential[person]
            assert (a["score"], a["templates"], a["photos"]) == (want["score"], want["templates"], want["photos"])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_serve_refuses_bad_options_in_one_line(tmp_path, demo):
    runner = CliRunner()
    for args, says in ((["--index-dir", str(tmp_path / "none")], "does not exist"),
                       (["--index-dir", str(demo["work"] / "index"), "--port", "70000"], "--port must be <= 65535"),
                       (["--index-dir", str(demo["work"] / "index"), "--max-photos", "0"], "--max-photos must be >= 1"),
                       (["--index-dir", str(demo["work"] / "index"), "--reference", str(tmp_path)], "summary.json")):
        r = runner.invoke(cli_app, ["serve", *args])
        assert r.exit_code in (1, 2) and says in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_a_reference_over_another_index_is_refused(settings, demo, tmp_path):
    from idia_engine.engine.errors import ManifestMismatchError

    other = tmp_path / "report"
    shutil.copytree(demo["work"] / "report", other)
    summary = json.loads((other / "summary.json").read_text())
    summary["index"]["names_sha256"] = "0" * 64
    (other / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ManifestMismatchError, match="another index"):
        load(replace(settings, reference=other))


def test_the_api_is_documented(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/attack"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(body["required"]) == {"name", "photos"}


def test_a_port_in_use_is_one_line():
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(Exception) as e:
            bind("127.0.0.1", sock.getsockname()[1])
        assert "choose another --port" in str(e.value)
    finally:
        sock.close()



def test_an_approximate_index_gives_the_flat_answers(loaded, demo, tmp_path):
    """Every top-1 is exact whatever the kind: IVF candidates re-ranked, certified, the rest brute-forced."""
    from idia_engine.engine.index.build import BuildConfig, build_index

    model = loaded.scorer.model
    build_index(BuildConfig(names_file=demo["work"] / "names.txt", index_dir=tmp_path / "ivf",
                            model=model.info.as_spec(), index_kind="IVF8,Flat", device="cpu"), model=model)
    settings = ServeSettings(index_dir=tmp_path / "ivf", device="cpu")
    ivf = load(settings, model)
    try:
        client = TestClient(ivf.app(settings))
        flat = TestClient(loaded.app(replace(settings, index_dir=demo["work"] / "index")))
        for person in (demo["member"], demo["non_member"]):
            a = _attack(client, person, _photos(demo, person, 12))
            b = _attack(flat, person, _photos(demo, person, 12))
            assert (a["score"], a["templates"]) == (b["score"], b["templates"])
            assert a["exact"]["exact_by_index"] == 0
            assert a["exact"]["certified"] + a["exact"]["brute_forced"] == a["photos_used"] * 21
    finally:
        ivf.scorer.close()
