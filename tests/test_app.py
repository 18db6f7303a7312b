"""The web page (`featgender serve`): its API through gradio_client, and the page in a real
browser (headless Chromium from Debian's packages, driven by Selenium)."""

import csv
import shutil
import socket
from pathlib import Path

import pytest

from featgender.app import call, render
from featgender.errors import FeatgenderError

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_faces_near_the_threshold_are_called_uncertain():
    assert [call(p, 0.5) for p in (0.95, 0.61, 0.5, 0.39, 0.05)] == ["male", "male", "uncertain", "female", "female"]
    assert call(0.55, 0.5) == "uncertain" and call(0.55, 0.7) == "female" and call(0.55, 0.4) == "male"
    page, rows = render(
        {
            "image": "data:image/jpeg;base64,",
            "size": [200, 100],
            "faces": [([10, 20, 60, 80], 0.93), ([100, 0, 200, 100], 0.52)],
        },
        0.5,
    )
    assert rows == [[1, "10,20,60,80", "male", 0.93], [2, "100,0,200,100", "uncertain", 0.52]]
    assert 'data-label="male"' in page and "left:5.00%;top:20.00%;width:25.00%;height:60.00%" in page
    assert render({}, 0.5) == ("", [])


def test_a_page_reachable_by_others_needs_a_password():
    from featgender.app import serve

    with pytest.raises(FeatgenderError, match="--host 0.0.0.0: the page would be reachable by others; give --auth"):
        serve("any.joblib", host="0.0.0.0")
    with pytest.raises(FeatgenderError, match="--share: .* give --auth"):
        serve("any.joblib", share=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(dlib_model):
    """The page over the dlib model, on 127.0.0.1 at a free port: (url, upload folder)."""
    pytest.importorskip("gradio")
    from featgender.app import serve

    blocks, url, folder = serve(dlib_model[0], port=_free_port(), block=False)
    yield url, Path(folder)
    blocks.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_the_api_gives_what_featgender_predict_gives(server, dlib_model, group_photo, tmp_path):
    from gradio_client import Client, handle_file

    import featgender

    url, folder = server
    client = Client(url, verbose=False)
    drawn, table, message = client.predict(handle_file(str(group_photo)), 0.5, api_name="/analyse")
    expected = sorted(featgender.load(dlib_model[0]).predict([group_photo], all_faces=True), key=lambda p: p.box[0])
    rows = sorted(table["data"], key=lambda row: int(row[1].split(",")[0]))
    assert message == "group.jpg: 2 faces found."
    assert [row[1] for row in rows] == [",".join(map(str, p.box)) for p in expected]
    assert [row[3] for row in rows] == pytest.approx([p.probability for p in expected], abs=1e-4)
    assert [row[2] for row in rows] == [call(p.probability, 0.5) for p in expected]
    assert drawn.count('class="fg-face"') == 2
    (tmp_path / "notes.jpg").write_text("not a picture")
    _, table, message = client.predict(handle_file(str(tmp_path / "notes.jpg")), 0.5, api_name="/analyse")
    assert message.startswith("notes.jpg: cannot be read as an image") and not table["data"]
    assert str(folder) not in message  # no server paths in the page
    assert not [path for path in folder.rglob("*") if path.is_file() and path.suffix == ".jpg"]  # uploads gone
    csv_path, summary = client.predict(
        [handle_file(str(group_photo)), handle_file(str(tmp_path / "notes.jpg"))], api_name="/batch"
    )
    with open(csv_path, newline="") as handle:
        written = list(csv.reader(handle))
    assert written[0] == ["id", "label", "box"] and len(written) == 2 and written[1][0] == "group.jpg"
    assert summary.startswith("1 of 2 images classified")


def test_bad_uploads_get_a_message_and_the_queue_goes_on(server, group_photo, tmp_path, monkeypatch):
    import numpy as np
    from gradio_client import Client, handle_file
    from PIL import Image

    client = Client(server[0], verbose=False)
    whole = group_photo.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.open(group_photo).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.asarray(Image.open(group_photo).convert("L")).astype(np.uint16) * 257).save(
        tmp_path / "deep.png"
    )
    Image.new("L", (300, 300)).save(tmp_path / "bomb.png")
    messages = {}
    for name in ("truncated.jpg", "empty.jpg", "cmyk.jpg", "deep.png"):
        messages[name] = client.predict(handle_file(str(tmp_path / name)), 0.5, api_name="/analyse")[2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # the server runs in this process: 300 x 300 is a bomb
    messages["bomb.png"] = client.predict(handle_file(str(tmp_path / "bomb.png")), 0.5, api_name="/analyse")[2]
    monkeypatch.undo()
    assert messages["truncated.jpg"].startswith("truncated.jpg: ")  # decoded as far as it goes, or refused
    assert messages["empty.jpg"].startswith("empty.jpg: cannot be read as an image")
    assert messages["cmyk.jpg"] == "cmyk.jpg: 2 faces found." and messages["deep.png"].startswith("deep.png: ")
    assert "DecompressionBomb" in messages["bomb.png"]
    assert client.predict(handle_file(str(group_photo)), 0.5, api_name="/analyse")[2] == "group.jpg: 2 faces found."


def test_clients_sending_the_same_photo_at_once_all_get_answers(server, group_photo):
    """Gradio files uploads by content, so identical photos share one file; the first request
    deletes it, and the others, queued meanwhile, must still get their answer."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    def ask(_):
        return Client(server[0], verbose=False).predict(handle_file(str(group_photo)), 0.5, api_name="/analyse")[2]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == ["group.jpg: 2 faces found."] * 4
    assert not [path for path in server[1].rglob("*.jpg")]


def test_the_model_card_says_what_the_artifact_records(dlib_model):
    import featgender
    from featgender.app import model_card

    card = model_card(featgender.load(dlib_model[0]))
    assert "**Head** `logreg` on `dlib_resnet`" in card and "**Trained on** 240 images" in card
    assert "scikit-learn" in card and "torch" in card


def test_a_stopped_server_removes_its_upload_folder(dlib_model, tmp_path):
    """SIGTERM (a service manager's stop) ends `featgender serve` like Ctrl-C: its folder goes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("gradio")
    server = subprocess.Popen(
        [sys.executable, "-m", "featgender", "serve", "--model", str(dlib_model[0]), "--port", str(_free_port())],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600  # a bound for a server that never starts
        while "Running on local URL" not in server.stdout.readline():
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        assert [path.name[:17] for path in tmp_path.iterdir()] == ["featgender-serve-"]
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        server.kill()
    assert not list(tmp_path.iterdir())


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_in_a_real_browser(server, dlib_model, group_photo, tmp_path):
    """Load the page, upload the two-face photo, see two boxes labelled as predict labels
    them; upload a non-image and read the message; a screenshot is kept in test-artifacts/."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    import featgender

    url, _ = server
    expected = sorted(featgender.load(dlib_model[0]).predict([group_photo], all_faces=True), key=lambda p: p.box[0])
    browser = _browser()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 300)  # bounds for a page that never answers
        wait.until(ready.presence_of_element_located((By.ID, "fg-analyse")))
        assert "perceived gender" in browser.find_element(By.ID, "fg-responsible-use").text

        def upload_and_analyse(path: Path) -> None:
            browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
            wait.until(
                lambda _: (
                    browser.find_elements(By.CSS_SELECTOR, "img[src^='blob:'], img[src*='/file=']")
                    or browser.find_elements(By.CSS_SELECTOR, "[data-testid='image'] img")
                )
            )
            browser.find_element(By.ID, "fg-analyse").click()

        upload_and_analyse(group_photo)
        wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#fg-result .fg-face")) == 2)
        boxes = sorted(browser.find_elements(By.CSS_SELECTOR, "#fg-result .fg-face"), key=lambda box: box.location["x"])
        assert [box.get_attribute("data-label") for box in boxes] == [call(p.probability, 0.5) for p in expected]
        assert "2 faces found" in browser.find_element(By.ID, "fg-message").text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve-two-faces.png"))
        assert (ARTIFACTS / "serve-two-faces.png").stat().st_size > 10_000

        notes = tmp_path / "notes.png"
        notes.write_text("not a picture")
        browser.find_element(By.CSS_SELECTOR, "button[aria-label='Clear']").click() if browser.find_elements(
            By.CSS_SELECTOR, "button[aria-label='Clear']"
        ) else None
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(notes))
        browser.find_element(By.ID, "fg-analyse").click()
        wait.until(lambda _: "cannot be read as an image" in browser.find_element(By.ID, "fg-message").text)
        browser.save_screenshot(str(ARTIFACTS / "serve-not-an-image.png"))
    finally:
        browser.quit()
