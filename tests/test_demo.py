"""The draw-and-read web demo (digit_vit/demo.py and digit_vit/web/).

Server-level tests speak HTTP to a demo server on a free port (a thread of this process, around
a reader of a freshly trained tiny run): the page and its assets, a reading, and every kind of
bad input answered with a JSON error while the server keeps serving. The end-to-end test drives
the real page in headless Chromium with Playwright: it draws with the mouse and a finger,
classifies, clears and uploads images, and checks that the page shows what `predict` reads.

Reliability tests (issue 47) send bounded traffic to 127.0.0.1 only, with socket timeouts, and
stand in for slow work with events rather than long sleeps: a slow preprocessing holds up no
one else, 40 concurrent reads all succeed, slow clients are cut off, every error is JSON, and a
client that hangs up costs one log line.
"""

import base64
import contextlib
import http.client
import io
import json
import logging
import os
import re
import socket
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

from digit_vit import cli, demo, demo_load, predict, preprocess
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
  return reader.read([preprocess.load_image(image_file)], attention=True)[0]


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
      "height": 16, "width": 48, "max_digits": 3, "max_length": 16, "buckets": [24, 48],
      "beam_size": reader.beam_size,
      "views": reader.views, "step": reader.step, "ensemble": 0,
      "max_request_bytes": demo.MAX_REQUEST_BYTES, "max_pixels": preprocess.MAX_PIXELS}


def test_read_returns_what_predict_reads(server, reader, test_image):
  path, _ = test_image
  image_file = path.read_bytes()
  expected = _expected(reader, image_file)
  status, reading = _post_json(server, _read_request(image_file))
  assert status == 200, reading
  assert reading["digits"] == expected.digits and re.fullmatch(r"[0-9]*", reading["digits"])
  # Up to decode.max_length digits and the <eos>, far past the 3 of the training lines.
  assert reading["tokens"] == expected.tokens and len(reading["tokens"]) == 16 + 1
  assert reading["token_names"] == [tokens.TOKEN_NAMES[t] for t in expected.tokens]
  assert reading["confidence"] == pytest.approx(expected.confidence, rel=1e-5)
  assert 0.0 <= reading["confidence"] <= 1.0 and reading["no_ink"] is False
  assert reading["truncated"] is expected.truncated
  # The line at its own width, as predict prepared it.
  assert _image_from_data_url(reading["canvas"]).size == expected.canvas.shape[::-1]
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
                        f"{preprocess.MAX_PIXELS:,}"),
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
    assert payload["tokens"] == [11] + [12] * 16
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

  def prepare(self, images):
    return [np.zeros((self.height, self.width), np.float32) for _ in images]

  def read_prepared(self, canvases, attention=False):
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


@pytest.fixture
def restore_demo_log():
  """`demo.main` gives the demo logger a stderr handler and stops propagation; undone after
  the test, or later tests' logs would go to a closed capture stream ("Logging error")."""
  logger = logging.getLogger("digit_vit.demo")
  saved = logger.handlers[:], logger.propagate, logger.level
  yield
  handlers, propagate, level = saved
  logger.handlers[:] = handlers
  logger.propagate = propagate
  logger.setLevel(level)


def test_command_line(tmp_path, capsys, restore_demo_log):
  with pytest.raises(SystemExit) as exit_info:
    cli.call(demo, ["--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  for flag in ("--workdir", "--host", "--port", "--beam_size", "--views", "--checkpoint",
               "--ensemble", "--workers", "--read_timeout", "--request_timeout"):
    assert flag in usage
  assert cli.parse(demo, ["--workdir=a", "--ensemble=b,c@latest"]).ensemble == ["b", "c@latest"]
  args = cli.parse(demo, ["--workdir=a", "--workers=3", "--request_timeout=2.5"])
  assert (args.workers, args.request_timeout, args.read_timeout) == (3, 2.5, demo.READ_TIMEOUT)
  for bad, message in (("--workers=0", "not a positive integer"),
                       ("--read_timeout=0", "expected a positive number of seconds")):
    with pytest.raises(SystemExit) as exit_info:
      cli.parse(demo, ["--workdir=a", bad])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
  assert cli.call(demo, [f"--workdir={tmp_path / 'missing'}"]) == 2
  assert "config.json not found" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    cli.call(demo, ["--workdir=x", "--checkpoint=newest"])
  assert exit_info.value.code == 2
  assert "'best', 'latest' or a step" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Reliability (issue 47): bounded work per request, load, slow clients, errors, hang-ups


@contextlib.contextmanager
def _serving(reader, **kwargs):
  """A demo server of its own (kwargs: DemoServer's limits) on a thread, for one test."""
  server = demo.make_server(reader, "127.0.0.1", 0, **kwargs)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class _Records(logging.Handler):
  def __init__(self):
    super().__init__()
    self.records = []

  def emit(self, record):
    self.records.append(record)


@contextlib.contextmanager
def _demo_log():
  """The demo logger's records (on the logger itself: `demo.main` stops propagation)."""
  handler, logger = _Records(), logging.getLogger("digit_vit.demo")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield handler.records
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _timed_post(server, body):
  start = time.monotonic()
  status, payload = _post_json(server, body)
  return status, payload, time.monotonic() - start


def test_reading_json_reports_truncation():
  canvas = np.zeros((16, 48), np.float32)
  full = predict.Prediction(tokens=[1] * 6, digits="111111", confidence=0.5, log_prob=-0.7,
                            canvas=canvas, truncated=True)
  assert demo.reading_json(full)["truncated"] is True
  ended = predict.Prediction(tokens=[1, 11, 12], digits="1", confidence=0.5, log_prob=-0.7,
                             canvas=canvas)
  assert demo.reading_json(ended)["truncated"] is False
  assert json.loads(json.dumps(demo.reading_json(full)))["truncated"] is True
  assert demo.reading_json(ended)["rejected"] is False
  ended.rejected = True  # Below the server's --min_confidence.
  assert json.loads(json.dumps(demo.reading_json(ended)))["rejected"] is True


def test_min_confidence_is_a_probability_and_marks_readings(reader, test_image, capsys):
  assert cli.parse(demo, ["--workdir=a"]).min_confidence == 0.0  # Off unless asked.
  assert cli.parse(demo, ["--workdir=a", "--min_confidence=0.75"]).min_confidence == 0.75
  for bad in ("1.5", "-0.1", "nan", "high"):
    with pytest.raises(SystemExit) as exit_info:
      cli.parse(demo, ["--workdir=a", f"--min_confidence={bad}"])
    assert exit_info.value.code == 2
    assert "expected a probability in [0, 1]" in capsys.readouterr().err
  # The reader marks a reading below its threshold, and the JSON says so.
  image = preprocess.load_image(test_image[0])
  (plain,) = reader.read([image])
  (above,) = reader.read([image], min_confidence=plain.confidence / 2)
  (below,) = reader.read([image], min_confidence=min(1.0, plain.confidence * 2))
  assert not plain.rejected and not above.rejected and below.rejected
  assert demo.reading_json(below)["rejected"] is True


def test_slow_preprocessing_does_not_hold_up_other_requests(reader, test_image, monkeypatch):
  """The preprocessing runs outside the model lock, and past `request_timeout` it is a 504."""
  image_file = test_image[0].read_bytes()
  expected = _expected(reader, image_file)  # Also compiles the decoder before timing.
  slow_file = _png(Image.new("L", (97, 31), 0))  # Its size marks the slow one.
  entered, release = threading.Event(), threading.Event()
  prepare = reader.prepare

  def slow_prepare(images):
    if images[0].shape == (31, 97):  # An 80-second image, cut short when the test ends.
      entered.set()
      release.wait(timeout=10)
    return prepare(images)

  monkeypatch.setattr(reader, "prepare", slow_prepare)
  slow = []
  with _serving(reader, request_timeout=3.0) as server:
    thread = threading.Thread(target=lambda: slow.append(
        _timed_post(server, _read_request(slow_file))), daemon=True)
    thread.start()
    try:
      assert entered.wait(timeout=20)
      status, reading, seconds = _timed_post(server, _read_request(image_file))
      assert status == 200 and reading["tokens"] == expected.tokens
      assert seconds < 2.0 and not slow  # It was 67 s when the slow one held the model lock.
      thread.join(timeout=20)
      status, payload, seconds = slow[0]
      assert status == 504 and "3 s limit" in payload["error"], payload
      assert 2.9 < seconds < 7  # Answered at the limit, while its preprocessing still runs.
    finally:
      release.set()
    status, reading, _ = _timed_post(server, _read_request(image_file))
    assert status == 200 and reading["tokens"] == expected.tokens


def test_no_turn_at_the_model_in_time_is_a_503(reader, test_image, monkeypatch):
  image_file = test_image[0].read_bytes()
  expected = _expected(reader, image_file)
  entered, release = threading.Event(), threading.Event()
  read_prepared = reader.read_prepared

  def held_read(canvases, **kwargs):
    if not entered.is_set():  # The first reading keeps the model busy.
      entered.set()
      release.wait(timeout=10)
    return read_prepared(canvases, **kwargs)

  monkeypatch.setattr(reader, "read_prepared", held_read)
  first = []
  with _serving(reader, request_timeout=1.0) as server:
    thread = threading.Thread(target=lambda: first.append(
        _timed_post(server, _read_request(image_file))), daemon=True)
    thread.start()
    try:
      assert entered.wait(timeout=20)
      start = time.monotonic()
      status, headers, body = _request(server, "POST", "/api/read", _read_request(image_file))
      seconds = time.monotonic() - start
      assert status == 503 and headers["Retry-After"] == "1"
      assert "busy" in json.loads(body)["error"] and 0.9 < seconds < 4
    finally:
      release.set()
    thread.join(timeout=20)
    status, reading, _ = first[0]  # The reading that held the model is still answered.
    assert status == 200 and reading["tokens"] == expected.tokens


def test_forty_concurrent_reads_are_all_answered(server, reader, test_image):
  """The stdlib's listen backlog of 5 reset 9 to 22 of these (or, where the kernel drops the
  handshakes of a full backlog instead, made their clients retry after 1, 3, 7 s): each
  connection must open within a second, and each read be answered."""
  image_file = test_image[0].read_bytes()
  expected = _expected(reader, image_file)
  request = demo_load.read_request(image_file)
  gate = threading.Barrier(40)
  answers = [None] * 40

  def client(i):
    gate.wait(timeout=30)
    answers[i] = demo_load.exchange(server.server_address, request, timeout=60,
                                    connect_timeout=1.0)

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(40)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=90)
  failures = [a and (a.status or a.error) for a in answers if a is None or a.status != 200]
  assert not failures
  assert all(a.json()["tokens"] == expected.tokens for a in answers)


def test_slow_clients_are_cut_off_and_others_still_served(reader, test_image):
  """Clients that announce more body than they send hold a worker for a bounded time, on a
  bounded pool (no thread each), and a normal request queued behind them is answered."""
  image_file = test_image[0].read_bytes()
  expected = _expected(reader, image_file)
  # While connections wait for one of the 4 workers, a request has 0.5 s to arrive, not 5.
  with _serving(reader, workers=4, read_timeout=5.0, busy_read_timeout=0.5) as server:
    threads_before = threading.active_count()
    slow = []
    try:
      for announced in [10**6] * 10 + [10**7] * 2:  # Up to the body limit, and over it.
        sock = socket.create_connection(server.server_address, timeout=20)
        slow.append(sock)
        sock.sendall(b"POST /api/read HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n{\"image\": " % announced)
      assert threading.active_count() <= threads_before  # The old server: a thread each.
      status, reading, seconds = _timed_post(server, _read_request(image_file))
      assert status == 200 and reading["tokens"] == expected.tokens
      # Behind 12 slow clients on 4 workers: 3 rounds of 0.5 s (and 0.5 s of lingering each).
      assert seconds < 3 * (0.5 + demo._LINGER_SECONDS) + 3  # With 5 s each: over 15 s.
      answers = []
      for sock in slow:  # Each was cut off: answered and closed, not left hanging.
        data = b""
        while chunk := sock.recv(65536):
          data += chunk
        answers.append(demo_load.parse_response(data))
    finally:
      for sock in slow:
        sock.close()
  assert [a.status for a in answers] == [408] * 10 + [413] * 2
  assert all(a.is_json for a in answers)
  assert "did not arrive within the 0.5 s limit (10 of 1,000,000" in answers[0].json()["error"]


def test_a_slow_client_alone_gets_the_full_read_timeout(reader):
  with _serving(reader, workers=4, read_timeout=1.5, busy_read_timeout=0.2) as server:
    answer = demo_load.exchange(
        server.server_address, b"POST /api/read HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
        timeout=20)
  assert answer.status == 408 and "1.5 s limit (1 of 100" in answer.json()["error"]
  assert 1.4 < answer.seconds < 5


RAW_REQUESTS = {
    # name: (request bytes, status, what the error says)
    "garbage request line": (b"GARBAGE\r\n\r\n", 400, "Bad request syntax"),
    "PUT": (demo_load.http_request("PUT", "/api/read", b"{}"), 405, "PUT is not allowed"),
    "DELETE": (demo_load.http_request("DELETE", "/"), 405, "DELETE is not allowed"),
    "unknown method": (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501, "GET, HEAD, POST"),
    "URI too long": (demo_load.http_request("GET", "/" + "a" * 70_000), 414, "URI"),
    "header too long": (demo_load.http_request("GET", "/", headers=["X: " + "b" * 70_000]), 431,
                        "Line too long"),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP version"),
}


@pytest.mark.parametrize("name", RAW_REQUESTS)
def test_every_error_is_json(server, name):
  request, status, message = RAW_REQUESTS[name]
  answer = demo_load.exchange(server.server_address, request, timeout=30)
  assert answer.status == status, answer
  assert answer.headers["content-type"] == "application/json" and answer.is_json
  assert message in answer.json()["error"]
  if status == 405:
    assert answer.headers["allow"] == "GET, HEAD, POST"
  status, _, _ = _request(server, "GET", "/api/info")  # Still serving.
  assert status == 200


def test_head_answers_headers_only(server):
  status, headers, body = _request(server, "HEAD", "/")
  assert status == 200 and headers["Content-Type"].startswith("text/html") and body == b""
  assert int(headers["Content-Length"]) > 1000


def test_a_client_hanging_up_mid_response_logs_one_line_and_no_traceback(
    reader, test_image, monkeypatch, capfd):
  image_file = test_image[0].read_bytes()
  entered, hung_up = threading.Event(), threading.Event()
  prepare = reader.prepare

  def prepare_after_hang_up(images):
    entered.set()
    hung_up.wait(timeout=10)  # The answer is written after the client has gone.
    return prepare(images)

  monkeypatch.setattr(reader, "prepare", prepare_after_hang_up)
  with _demo_log() as records, _serving(reader) as server:
    sock = socket.create_connection(server.server_address, timeout=10)
    try:
      sock.sendall(_request_bytes(_read_request(image_file)))
      assert entered.wait(timeout=20)
      # Closing with SO_LINGER 0 resets the connection, as a browser tab closed mid-read.
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
      sock.close()
      hung_up.set()
    deadline = time.monotonic() + 10
    while not any("hung up" in r.getMessage() for r in records) and \
        time.monotonic() < deadline:
      time.sleep(0.05)
    monkeypatch.undo()
    status, _, _ = _timed_post(server, _read_request(image_file))
    assert status == 200
  hang_ups = [r.getMessage() for r in records if "hung up" in r.getMessage()]
  assert len(hang_ups) == 1 and "POST /api/read" in hang_ups[0], hang_ups
  assert not any(r.exc_info for r in records)
  assert "Traceback" not in capfd.readouterr().err


def _request_bytes(body: bytes) -> bytes:
  return demo_load.http_request("POST", "/api/read", body)


def test_demo_load_measures_a_demo(reader, tmp_path, capsys):
  report_path = tmp_path / "report.json"
  with _serving(reader, read_timeout=1.0) as server:  # Its short body is cut off in 1 s.
    assert cli.call(demo_load, [f"--url={server.url}", "--phases=reads,abuse", "--reads=8",
                                "--concurrency=4", f"--json={report_path}"]) == 0
  assert "reads: 8/8 answered 200" in capsys.readouterr().out
  report = json.loads(report_path.read_text())
  assert report["reads"]["ok"] == 8 and report["reads"]["errors"] == {}
  assert 0 < report["reads"]["p50_s"] <= report["reads"]["p95_s"] <= report["reads"]["max_s"]
  cases = report["abuse"]["cases"]
  assert {name: c["status"] for name, c in cases.items() if c["status"] in (405, 413, 422)} == {
      "PUT /api/read": 405, "DELETE /": 405, "empty canvas": 422, "1x1 image": 422,
      "oversize body (8 MiB + 1)": 413, "Content-Length 10 GB, no body": 413}
  assert all(c["json"] for name, c in cases.items() if not name.startswith("hang-up"))
  assert report["abuse"]["normal_read_after"]["status"] == 200
  # Loopback only: another address is refused before anything is sent.
  assert cli.call(demo_load, ["--url=http://192.0.2.1:8000/", "--phases=abuse"]) == 2
  assert "not a loopback address" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The page in headless Chromium


@pytest.fixture(scope="session")
def chromium():
  if not os.path.exists(CHROMIUM):  # `make browser` (run by `make test`) installs it.
    pytest.skip(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (root and "
                "apt-get), or install the chromium package to run the browser test")
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
  assert "up to 16 digits on lines 16 pixels high and up to 48 wide" in page.inner_text(
      "#model-info")

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
  assert page.is_hidden("#truncated") is not expected.truncated

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
  assert page.is_hidden("#truncated")

  # A reading that hit the decoder's length limit (the server's answer, marked truncated, as a
  # longer line would give on a real model): the page warns that digits may be missing.
  status, reading = _post_json(server, _read_request(path.read_bytes()))
  assert status == 200 and reading["truncated"] is False
  page.route("**/api/read", lambda route: route.fulfill(
      status=200, content_type="application/json",
      body=json.dumps({**reading, "truncated": True})))
  page.set_input_files("#upload", str(path))
  _wait_for_action(page, 6, "ok")
  assert page.is_visible("#truncated")
  assert "may hold more digits" in page.inner_text("#truncated")
  assert page.is_hidden("#uncertain")
  page.unroute("**/api/read")
  # A reading below the server's --min_confidence: shown, and flagged as uncertain.
  page.route("**/api/read", lambda route: route.fulfill(
      status=200, content_type="application/json",
      body=json.dumps({**reading, "rejected": True})))
  page.set_input_files("#upload", str(path))
  _wait_for_action(page, 7, "ok")
  assert page.is_visible("#uncertain") and "Uncertain" in page.inner_text("#uncertain")
  assert _shown_reading(page) == _reading_of(expected)
  page.unroute("**/api/read")
  page.set_input_files("#upload", str(path))
  _wait_for_action(page, 8, "ok")
  assert page.is_hidden("#truncated") and page.is_hidden("#uncertain")

  assert not problems
  assert requested and all(url.startswith(server.url) or url.startswith("data:")
                           for url in requested), requested
  context.close()
