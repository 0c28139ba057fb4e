"""The page in a real browser: headless Chromium (the system's, driven by Playwright) against a live loopback
server over the demo's index: a member's photos, a non-member's, a dropped file and a bad upload.

Screenshots land in test-artifacts/ at the top of the repository (or $IDIA_TEST_ARTIFACTS). Without a
Chromium the test is skipped, unless IDIA_REQUIRE_BROWSER=1 (CI sets it), where that is a failure.
"""

from __future__ import annotations

import csv
import os
import shutil
import threading
from pathlib import Path

import pytest
from idia_engine.engine.serve.server import bind, load
from idia_engine.engine.serve.settings import ServeSettings

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("IDIA_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _chromium() -> str:
    for candidate in (os.environ.get("IDIA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    if os.environ.get("IDIA_REQUIRE_BROWSER") == "1":
        pytest.fail("no Chromium found (apt install chromium), and IDIA_REQUIRE_BROWSER=1 requires it")
    pytest.skip("no Chromium on this machine (apt install chromium)")


@pytest.fixture(scope="module")
def live(small_demo):
    import uvicorn

    work, _ = small_demo
    settings = ServeSettings(index_dir=work / "index", reference=work / "report", device="cpu")
    loaded = load(settings)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(loaded.app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for startup
        if server.started:
            break
        threading.Event().wait(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", work
    server.should_exit = True
    thread.join(10)
    sock.close()
    loaded.scorer.close()


@pytest.fixture(scope="module")
def page(live):
    playwright = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def _person(work: Path, label: str) -> dict:
    with open(work / "report" / "persons.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if label == "member":
        return next(r for r in rows if r["label"] == "member" and int(r["score"]) >= 3)
    return next(r for r in rows if r["label"] == "non-member" and r["decision"] == "non-member")


def _check(page, base: str, work: Path, row: dict, shot: str) -> None:
    page.goto(base)
    page.wait_for_function("document.getElementById('about').textContent.includes('candidate names')")
    photos = sorted((work / "faces" / row["name"].replace(" ", "_")).iterdir())
    page.set_input_files("#photos", [str(p) for p in photos])
    page.fill("#name", row["name"])
    page.click("#go")
    page.wait_for_selector("#result:not([hidden])")
    decision = page.inner_text("#decision")
    if row["decision"] == "member":
        assert "decided member" in decision
    else:
        assert "decided non-member" in decision
    assert row["name"] in decision
    assert page.inner_text("#score").startswith(f"Score {row['score']} of 21 templates won")
    template_rows = page.locator("#templates tr")
    assert template_rows.count() == 22  # the header and the 21 templates
    won = page.locator("#templates td.won").count()
    assert won == int(row["score"])
    assert page.locator("#per-photo .photo img").count() == len(photos)
    assert "members" in page.inner_text("#reference")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)


def test_the_page_answers_for_a_member_and_a_non_member(page, live):
    base, work = live
    _check(page, base, work, _person(work, "member"), "serve-member.png")
    _check(page, base, work, _person(work, "non-member"), "serve-non-member.png")


def test_a_dropped_photo_is_used_and_a_bad_upload_says_why(page, live):
    base, work = live
    row = _person(work, "member")
    photo = sorted((work / "faces" / row["name"].replace(" ", "_")).iterdir())[0]
    page.goto(base)
    page.wait_for_function("document.getElementById('about').textContent.includes('candidate names')")
    data = list(photo.read_bytes())
    page.evaluate("""(bytes) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    }""", data)
    assert page.locator("#chosen .photo").count() == 1
    page.fill("#name", row["name"])
    page.click("#go")
    page.wait_for_selector("#result:not([hidden])")
    assert "from 1 photo(s)" in page.inner_text("#score")

    bad = Path(ARTIFACTS) / "not-a-photo.txt"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("a shopping list, not a face\n")
    page.goto(base)
    page.set_input_files("#photos", [str(bad)])
    page.fill("#name", row["name"])
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "photo 1 (not-a-photo.txt) is not an image" in page.inner_text("#error")
    assert page.locator("#result").is_hidden()
    page.screenshot(path=str(ARTIFACTS / "serve-bad-upload.png"), full_page=True)
    bad.unlink()
