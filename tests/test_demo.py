"""The draw-and-read web demo (digit_vit/demo.py and digit_vit/web/).

Server-level tests speak HTTP to a demo server on a free port (a thread of this process, around
a reader of a freshly trained tiny run): the page and its assets, a reading, and every kind of
bad input answered with a JSON error while the server keeps serving. The end-to-end test drives
the real page in headless Chromium with Playwright: it draws with the mouse and a finger,
classifies, clears and uploads images, and checks that the page shows what `predict` reads.
"""

import base64
import fcntl
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import pytest
from PIL import Image

from digit_vit import demo, predict
from digit_vit.data import input_pipeline
from digit_vit.models import tokens

CHROMIUM = "/usr/bin/chromium"
# Headless, and quiet on a machine without internet: no background fetches to refuse.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


# ----------------------------------------------------------------------------------------------
# Fixtures: a trained tiny run, its reader, a demo server, a test-split image


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
  return tiny_workdir  # conftest.py: one tiny training run per test session.


@pytest.fixture(scope="module")
def reader(workdir):
  return predict.Reader(workdir, batch_size=1)  # As the demo's command builds it.


@pytest.fixture(scope="module")
def server(reader):
  server = demo.make_server(reader, "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()
  thread.join(timeout=10)


@pytest.fixture(scope="module")
def test_image(workdir, tmp_path_factory):
  """A line of 2-3 test-split digits saved as dark ink on white paper: (path, label)."""
  config = predict.load_config(workdir)
  batch = next(input_pipeline.eval_iterator(config, "test", batch_size=16))
  i = int(np.flatnonzero(batch["length"] >= 2)[0])
  ink = batch["image"][i, ..., 0]  # float32 [16, 48], ink bright.
  path = tmp_path_factory.mktemp("upload") / "test_line.png"
  Image.fromarray(np.uint8(np.round(255 * (1 - ink)))).save(path)
  label = "".join(str(t) for t in batch["tokens"][i, 1:1 + batch["length"][i]])
  return path, label


# ----------------------------------------------------------------------------------------------
# Helpers


def _request(server, method, path, body=None, content_type="application/json"):
  """-> (status, headers, body bytes)."""
  connection = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
  try:
    headers = {} if body is None else {"Content-Type": content_type}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()
  finally:
    connection.close()


def _post_json(server, body: bytes, path="/api/read", content_type="application/json"):
  """-> (status, JSON payload); every answer of the API is JSON, errors included."""
  status, headers, data = _request(server, "POST", path, body, content_type)
  assert headers["Content-Type"] == "application/json"
  assert b"Traceback" not in data
  return status, json.loads(data)


def _data_url(data: bytes, mime="image/png") -> str:
  return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _read_request(image_file: bytes) -> bytes:
  return json.dumps({"image": _data_url(image_file)}).encode()


def _png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _image_from_data_url(url: str) -> Image.Image:
  prefix = "data:image/png;base64,"
  assert url.startswith(prefix)
  return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def _expected(reader, image_file: bytes) -> predict.Prediction:
  return reader.read([predict.load_image(image_file)], attention=True)[0]


# ----------------------------------------------------------------------------------------------
# The server, without a browser


def test_page_and_assets_are_local(server):
  status, headers, page = _request(server, "GET", "/")
  assert status == 200 and headers["Content-Type"].startswith("text/html")
  assert "default-src 'self'" in headers["Content-Security-Policy"]
  html = page.decode()
  for element_id in ("pad", "classify", "clear", "upload", "status", "digits", "tokens",
                     "confidence", "attention"):
    assert f'id="{element_id}"' in html, element_id
  links = re.findall(r'(?:src|href)="([^"]+)"', html)
  assets = [link for link in links if not link.startswith("data:")]
  assert sorted(assets) == ["/static/app.js", "/static/style.css"]
  texts = [html]
  for asset in assets:
    status, _, body = _request(server, "GET", asset)
    assert status == 200, asset
    texts.append(body.decode())
  for text in texts:  # No CDN, no web fonts: not a single address outside this server.
    assert "http://" not in text and "https://" not in text
  status, _, body = _request(server, "GET", "/static/../demo.py")
  assert status == 404 and "error" in json.loads(body)


def test_info(server, reader):
  status, _, body = _request(server, "GET", "/api/info")
  assert status == 200
  assert json.loads(body) == {
      "height": 16, "width": 48, "max_digits": 3, "beam_size": reader.beam_size,
      "views": reader.views, "step": reader.step, "ensemble": 0,
      "max_request_bytes": demo.MAX_REQUEST_BYTES, "max_pixels": predict.MAX_PIXELS}


def test_read_returns_what_predict_reads(server, reader, test_image):
  path, _ = test_image
  image_file = path.read_bytes()
  expected = _expected(reader, image_file)
  status, reading = _post_json(server, _read_request(image_file))
  assert status == 200, reading
  assert reading["digits"] == expected.digits and re.fullmatch(r"[0-9]*", reading["digits"])
  assert reading["tokens"] == expected.tokens and len(reading["tokens"]) == 3 + 1
  assert reading["token_names"] == [tokens.TOKEN_NAMES[t] for t in expected.tokens]
  assert reading["confidence"] == pytest.approx(expected.confidence, rel=1e-5)
  assert 0.0 <= reading["confidence"] <= 1.0 and reading["no_ink"] is False
  assert _image_from_data_url(reading["canvas"]).size == (48, 16)
  overlay = _image_from_data_url(reading["attention"])
  assert overlay.size == predict.attention_overlay(expected).size
  assert overlay.height > 16 * 4  # A row per output token, <eos> included: at least two rows.
  # The raw file works as well as the JSON data URL (`curl --data-binary @file.png`).
  status, raw = _post_json(server, image_file, content_type="image/png")
  assert status == 200 and raw["tokens"] == reading["tokens"]


def _white_png():
  return _png(Image.new("RGB", (800, 200), "white"))


def _huge_png():
  return _png(Image.new("L", (8000, 7000), 255))  # 56 megapixels, a few hundred KB of PNG.


BAD_INPUTS = {
    # name: (body, content type, status, what the message says)
    "not an image": (lambda: _read_request(b"GIF89a, or so it says"), "application/json", 400,
                     "not a readable image"),
    "empty canvas": (lambda: _read_request(_white_png()), "application/json", 422,
                     "draw some digits first"),
    "malformed JSON": (lambda: b'{"image": "data:image/png;base64,', "application/json", 400,
                       "not valid JSON"),
    "no image field": (lambda: b'{"picture": "x"}', "application/json", 400, 'no "image"'),
    "bad base64": (lambda: b'{"image": "data:image/png;base64,@@@"}', "application/json", 400,
                   "not base64"),
    "too many pixels": (lambda: _read_request(_huge_png()), "application/json", 400,
                        f"{predict.MAX_PIXELS:,}"),
    "oversize payload": (lambda: b"x" * (demo.MAX_REQUEST_BYTES + 1), "application/json", 413,
                         f"over the {demo.MAX_REQUEST_BYTES / 2**20:.1f} MiB limit"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(server, test_image, name):
  make_body, content_type, expected_status, message = BAD_INPUTS[name]
  status, payload = _post_json(server, make_body(), content_type=content_type)
  assert status == expected_status, payload
  assert message in payload["error"]
  if name == "empty canvas":  # The empty reading comes with the message.
    assert payload["no_ink"] is True and payload["digits"] == ""
    assert payload["tokens"] == [11, 12, 12, 12]
  status, reading = _post_json(server, _read_request(test_image[0].read_bytes()))
  assert status == 200 and re.fullmatch(r"[0-9]*", reading["digits"])


def test_unknown_paths_are_404_json(server):
  status, payload = _post_json(server, b"{}", path="/api/elsewhere")
  assert status == 404 and "/api/read" in payload["error"]
  status, headers, body = _request(server, "GET", "/nowhere")
  assert status == 404 and headers["Content-Type"] == "application/json"
  assert "the demo is at /" in json.loads(body)["error"]


def test_concurrent_requests_all_get_the_reading(server, reader, test_image):
  image_file = test_image[0].read_bytes()
  expected = _expected(reader, image_file)
  results = [None] * 4

  def post(i):
    results[i] = _post_json(server, _read_request(image_file))

  threads = [threading.Thread(target=post, args=(i,)) for i in range(len(results))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  for status, reading in results:
    assert status == 200 and reading["tokens"] == expected.tokens


class _BrokenReader:
  """Stands in for a Reader whose model call fails."""
  height, width, beam_size, views, step = 16, 48, 1, 1, 0

  def read(self, images, attention=False):
    raise RuntimeError("the model fell over")


def test_internal_error_is_a_json_message_not_a_traceback(test_image):
  server = demo.make_server(_BrokenReader(), "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    for _ in range(2):  # And the server still answers the next one.
      status, payload = _post_json(server, _read_request(test_image[0].read_bytes()))
      assert status == 500 and "server log" in payload["error"]
      assert "fell over" not in payload["error"]
  finally:
    server.shutdown()
    server.server_close()


def test_command_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(["--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  for flag in ("--workdir", "--host", "--port", "--beam_size", "--views", "--checkpoint",
               "--ensemble"):
    assert flag in usage
  assert demo.parse_args(["--workdir=a", "--ensemble=b,c@latest"]).ensemble == ["b", "c@latest"]
  assert demo.main([f"--workdir={tmp_path / 'missing'}"]) == 2
  assert "config.json not found" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    demo.main(["--workdir=x", "--checkpoint=newest"])
  assert "'best', 'latest' or a step" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The page in headless Chromium


def _install_chromium() -> str | None:
  """Installs Debian's chromium when missing; -> None, or why it cannot be had here."""
  if os.geteuid() != 0 or not shutil.which("apt-get"):
    return (f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get); "
            "install the chromium package to run the browser test")
  lock_path = os.path.join(tempfile.gettempdir(), "digit_vit_chromium_install.lock")
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # One pytest-xdist worker installs, the others wait.
    if os.path.exists(CHROMIUM):
      return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
      try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
      except subprocess.TimeoutExpired:
        return f"`{' '.join(command)}` took more than 30 minutes"
      if result.returncode != 0:
        return (f"`{' '.join(command)}` failed with exit status {result.returncode}: "
                f"{result.stderr.strip()[-600:]}")
  return None if os.path.exists(CHROMIUM) else f"apt-get installed chromium but not {CHROMIUM}"


@pytest.fixture(scope="session")
def chromium():
  if not os.path.exists(CHROMIUM):
    reason = _install_chromium()
    if reason:
      pytest.skip(reason)
  return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
  sync_api = pytest.importorskip("playwright.sync_api",
                                 reason="playwright is missing: pip install -e '.[test]'")
  with sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


_COUNT_INK = """() => {
  const pad = document.getElementById('pad');
  const rgba = pad.getContext('2d').getImageData(0, 0, pad.width, pad.height).data;
  let dark = 0;
  for (let i = 0; i < rgba.length; i += 4) dark += rgba[i] < 128;
  return dark;
}"""


def _wait_for_action(page, count: int, state: str):
  """Waits until the page has finished `count` actions; checks how the last one ended."""
  page.wait_for_selector(f'#status[data-seq="{count}"]', timeout=60_000)
  assert page.get_attribute("#status", "data-state") == state, page.inner_text("#status")


def _draw_with_mouse(page, box, points):
  """A stroke through `points`, given as fractions (x, y) of the pad."""
  xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
  page.mouse.move(*xy[0])
  page.mouse.down()
  for x, y in xy[1:]:
    page.mouse.move(x, y, steps=4)
  page.mouse.up()


def _draw_with_finger(cdp, box, points):
  """The same with touch events (pointer events of type 'touch' on the page)."""
  xy = [{"x": box["x"] + fx * box["width"], "y": box["y"] + fy * box["height"]}
        for fx, fy in points]
  cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [xy[0]]})
  for point in xy[1:]:
    cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
  cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def _shown_reading(page):
  return {"digits": page.get_attribute("#digits", "data-digits"),
          "tokens": page.inner_text("#tokens"), "confidence": page.inner_text("#confidence")}


def _reading_of(prediction):
  return {"digits": prediction.digits,
          "tokens": "[" + ", ".join(str(t) for t in prediction.tokens) + "]",
          "confidence": f"{100 * prediction.confidence:.1f}%"}


@pytest.mark.slow
def test_draw_classify_clear_and_upload_in_chromium(browser, server, reader, test_image,
                                                    tmp_path):
  context = browser.new_context(viewport={"width": 1000, "height": 1000}, has_touch=True)
  page = context.new_page()
  requested, problems = [], []
  page.on("request", lambda request: requested.append(request.url))
  page.on("pageerror", lambda error: problems.append(str(error)))
  # 4xx answers also log "Failed to load resource"; those are expected here.
  page.on("console", lambda m: problems.append(m.text) if m.type == "error" and
          "Failed to load resource" not in m.text else None)
  page.goto(server.url)
  page.wait_for_selector("#model-info:has-text('step')")
  assert f"step {reader.step}" in page.inner_text("#model-info")
  assert "16 × 48" in page.inner_text("#model-info")

  # Classify before drawing: a message, and no reading.
  page.click("#classify")
  _wait_for_action(page, 1, "error")
  assert "draw some digits first" in page.inner_text("#status")
  assert page.is_hidden("#result")

  # Draw "1 7 0": the 1 with a finger, the 7 and the 0 with the mouse.
  box = page.locator("#pad").bounding_box()
  _draw_with_finger(context.new_cdp_session(page), box, [(0.2, 0.15), (0.2, 0.5), (0.2, 0.85)])
  after_finger = page.evaluate(_COUNT_INK)
  assert after_finger > 1000  # A 14-pixel pen over about 140 pixels.
  _draw_with_mouse(page, box, [(0.35, 0.2), (0.5, 0.2), (0.4, 0.85)])
  angles = np.linspace(0, 2 * np.pi, 17)
  _draw_with_mouse(page, box, list(zip(0.7 + 0.07 * np.sin(angles), 0.5 - 0.33 * np.cos(angles))))
  assert page.evaluate(_COUNT_INK) > 3 * after_finger

  # Classify from the keyboard; the page shows what predict reads from the same drawing.
  page.focus("#classify")
  page.keyboard.press("Enter")
  _wait_for_action(page, 2, "ok")
  drawing = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
  expected = _expected(reader, base64.b64decode(drawing.split(",", 1)[1]))
  assert not expected.no_ink
  assert _shown_reading(page) == _reading_of(expected)
  assert page.inner_text("#digits") == (expected.digits or "(none)")
  assert page.locator("#token-names li").all_inner_texts() == [
      tokens.TOKEN_NAMES[t] for t in expected.tokens]
  page.wait_for_function("document.getElementById('attention').naturalWidth > 0")
  overlay = predict.attention_overlay(expected)
  assert page.evaluate("[document.getElementById('attention').naturalWidth, "
                       "document.getElementById('attention').naturalHeight]") == list(overlay.size)

  # Clear: a white pad and no reading.
  page.click("#clear")
  assert page.evaluate(_COUNT_INK) == 0
  assert page.is_hidden("#result")

  # Upload a test-split line: the page shows what predict reads from the file.
  path, _ = test_image
  page.set_input_files("#upload", str(path))
  _wait_for_action(page, 3, "ok")
  expected = predict.read_files(reader, [str(path)])[0]
  assert expected.error is None
  assert _shown_reading(page) == _reading_of(expected)
  assert path.name in page.inner_text("#status")

  # A file that is not an image: the server's message on the page, and the page still works.
  notes = tmp_path / "notes.png"
  notes.write_text("not a picture")
  page.set_input_files("#upload", str(notes))
  _wait_for_action(page, 4, "error")
  assert "not a readable image" in page.inner_text("#status")
  assert "Traceback" not in page.content()
  page.set_input_files("#upload", str(path))
  _wait_for_action(page, 5, "ok")
  assert _shown_reading(page) == _reading_of(expected)

  assert not problems
  assert requested and all(url.startswith(server.url) or url.startswith("data:")
                           for url in requested), requested
  context.close()
