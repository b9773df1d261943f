r"""Draw-and-read web demo: draw a line of digits with the mouse, a pen or a finger, press
Classify, and see what the model reads.

  python -m digit_vit.demo --workdir=runs/default [--host=127.0.0.1] [--port=8000] \
      [--beam_size=4] [--views=5] [--checkpoint=best] [--ensemble=RUN[@CHECKPOINT],...] \
      [--workers=32] [--read_timeout=5] [--request_timeout=30] [--min_confidence=0.9]
  python -m digit_vit.demo --model=EXPORTED_DIR [--host=...] [--port=...] [--workers=...] ...
  python -m digit_vit.demo [--host=...] [--port=...] ...     # the released reader

(--model: an exported reader, `python -m digit_vit.export`, loaded by `digit_vit.serving`; its
decoding was fixed at export, so --beam_size, --views, --checkpoint and --ensemble are for
--workdir only. With neither, the released reader, `release/reader` of the repository
(`predict.reader_source`); without one, a one-line usage error says how to get a reader.)

then open the printed address in a browser. The page (digit_vit/web/) is served from this
process with no asset from the internet, so the demo runs offline. It shows the raw tokens
(e.g. [1, 0, 1, 11, 12, ...]), the digits, the confidence, the model's input canvas and the
attention map of every output token; an image file can be uploaded instead of drawn.

HTTP interface (every answer is JSON except the page itself, errors included):

  GET  /               the page; GET /static/NAME: its script and style (HEAD works too)
  GET  /api/info       {"height", "width", "max_digits", "beam_size", "views", "step",
                        "ensemble" (how many more models read along), "max_request_bytes",
                        "max_pixels"}
  POST /api/read       body {"image": "data:image/png;base64,..."} (or the raw image bytes)
    200  {"digits": "101", "tokens": [1, 0, 1, 11, 12, ...], "token_names": ["1", ...],
          "confidence": 0.93, "log_prob": -0.07, "no_ink": false, "truncated": false,
          "rejected": false,
          "seconds": 0.04, "canvas": PNG data URL of the model input [H, W],
          "attention": PNG data URL of `predict.attention_overlay` (one row per token)}
         "truncated": the decoder reached its maximum length without `<eos>`, so the line
         may hold more digits than "digits" has (the page shows a warning).
         "rejected": the (calibrated) confidence is below --min_confidence: the page shows the
         reading as uncertain.
    400  {"error": ...} malformed JSON, no "image", bad base64, not an image, too many
         pixels, a body shorter than its Content-Length, a malformed request line
    405 / 501  another method / one HTTP does not know
    408  the request did not arrive within `read_timeout` seconds (`busy_read_timeout` while
         connections wait for a worker)
    411 / 413 / 414 / 431  no Content-Length / body over `max_request_bytes` / a request
         line or headers over http.server's limits
    422  {"error": "... draw some digits first ...", + the empty reading} an image with no ink
    503  {"error": ...} busy: no worker, preprocessing slot or turn at the model within
         `request_timeout` seconds of the connection's arrival (with Retry-After)
    504  {"error": ...} preparing the image took longer than `request_timeout`

Serving, bounded everywhere (docs/reliability.md has the load and abuse figures):
  * Connections wait in a listen backlog of `BACKLOG`, then in a queue of at most
    `max_pending`, for one of `workers` threads (not a thread per connection); beyond that a
    connection is answered 503 at once.
  * A request must arrive whole (request line, headers, body) within `read_timeout` seconds
    of a worker taking it, or `busy_read_timeout` while other connections wait for a worker:
    a client that announces more than it sends is cut off with 408, and a crowd of them
    cannot keep the others waiting for long.
  * Decoding and preprocessing (`Reader.prepare`, pure numpy/Pillow) run on a small pool of
    their own, outside the model lock; only `Reader.read_prepared` holds the lock (one
    compiled decoder). Each request has `request_timeout` seconds from its arrival until
    the model starts reading it, or it is answered 503/504; a runaway preprocessing job
    finishes in the background without holding a worker or the model.
  * A client that hangs up costs one short log line, no traceback; each request is logged on
    one line.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import importlib.resources
import io
import json
import logging
import queue
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from absl import app, flags
from PIL import Image

from digit_vit import cli, logs, predict, preprocess
from digit_vit.models import tokens

log = logging.getLogger("digit_vit.demo")

# A drawing from the page is a few tens of KB; 8 MiB of base64 holds a 6 MiB photo.
MAX_REQUEST_BYTES = 8 * 2**20
# Larger bodies are not even read to the end: the connection is closed instead.
_MAX_DISCARD_BYTES = 64 * 2**20
# The listen backlog: the stdlib's 5 reset connections when 40 clients arrived at once.
BACKLOG = 256
# Worker threads: they mostly wait for the network or their turn at the model (which serves
# one request at a time), so many more than the cores: idle threads cost little, and each slow
# client holds one for up to READ_TIMEOUT.
WORKERS = 32
# Accepted connections waiting for a worker; beyond them a connection is answered 503.
MAX_PENDING = 128
# Seconds for a whole request to arrive once a worker takes it: a page's drawing takes
# milliseconds, an 8 MiB upload 5 s at 13 Mbit/s (raise it for slower links).
READ_TIMEOUT = 5.0
# The same while connections wait for a worker: then a slow client is cut off sooner, since
# the requests queued behind it (first come, first served) wait as long as it is given.
BUSY_READ_TIMEOUT = 1.0
# How often a blocked read looks whether connections have started to wait.
_READ_POLL_SECONDS = 0.2
# Seconds from a connection's arrival until the model starts reading its image.
REQUEST_TIMEOUT = 30.0
# Preprocessing threads: CPU work, so about the cores, and more than one so that a single
# pathological image leaves the others a thread.
PREPARE_WORKERS = 2
# After answering, the server reads (and drops) what the client still sends for this long,
# so that unread bytes do not make the kernel reset the connection before the client has read
# the answer (an error sent before a whole body arrived, a 414 or 431).
_LINGER_SECONDS = 0.5
_LINGER_BYTES = 4 * 2**20
NO_INK_MESSAGE = ("No ink found: draw some digits first (dark strokes on the white area), "
                  "or upload an image of digits.")
_WEB = importlib.resources.files("digit_vit") / "web"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".png": "image/png",
                  ".svg": "image/svg+xml"}
# The page may load only what this server sends (and images it builds itself as data: URLs).
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")
_DATA_URL = re.compile(r"data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.ASCII)
_ALLOWED_METHODS = "GET, HEAD, POST"
# Sent straight on the socket when even the pending queue is full (no worker reads it).
_BUSY_ANSWER = json.dumps({"error": "The demo server is busy: too many open connections; "
                                    "try again in a moment."}).encode()
_BUSY_RESPONSE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                  + str(len(_BUSY_ANSWER)).encode() + b"\r\n\r\n" + _BUSY_ANSWER)
# A client that went away: one log line, no traceback.
_HANG_UPS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class RequestError(Exception):
  """A request the demo refuses: answered with `status` and JSON {"error": message, **extra}."""

  def __init__(self, status: int, message: str, **extra: Any):
    super().__init__(message)
    self.status = status
    self.payload = {"error": message, **extra}


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def png_data_url(image: Image.Image | np.ndarray) -> str:
  """A PIL image, or a float array [H, W] in [0, 1], as a `data:image/png;base64,` URL."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(np.uint8(np.round(np.clip(image, 0, 1) * 255)))
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_bytes(body: bytes, content_type: str) -> bytes:
  """The image file inside a /api/read body: JSON {"image": data URL or base64} when the
  content type is JSON, else the body itself (`curl --data-binary @digits.png`)."""
  if not content_type.lower().startswith("application/json"):
    return body
  try:
    message = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RequestError(400, f"The request body is not valid JSON ({e}); send "
                       '{"image": "data:image/png;base64,..."}.') from None
  if not isinstance(message, dict) or not isinstance(message.get("image"), str):
    raise RequestError(400, 'The JSON has no "image" string; send '
                       '{"image": "data:image/png;base64,..."}.')
  text = message["image"].strip()
  match = _DATA_URL.match(text)
  try:
    return base64.b64decode(text[match.end():] if match else text, validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(400, 'The "image" is not base64 data; send a data URL such as '
                       "canvas.toDataURL('image/png') gives.") from None


def reading_json(prediction: predict.Prediction) -> dict[str, Any]:
  """A Prediction (read with attention=True) as the JSON reading the page shows."""
  out = {"digits": prediction.digits, "tokens": list(prediction.tokens),
         "token_names": [tokens.TOKEN_NAMES[t] for t in prediction.tokens],
         "confidence": prediction.confidence, "log_prob": prediction.log_prob,
         "no_ink": prediction.no_ink, "truncated": bool(prediction.truncated),
         "rejected": bool(getattr(prediction, "rejected", False)),
         "canvas": None, "attention": None}
  if prediction.canvas is not None:
    out["canvas"] = png_data_url(prediction.canvas)
  if prediction.attention is not None:
    out["attention"] = png_data_url(predict.attention_overlay(prediction))
  return out


class WorkerPool:
  """`workers` daemon threads running submitted jobs, at most `max_pending` of them waiting.

  Unlike concurrent.futures.ThreadPoolExecutor, the queue is bounded (`submit` raises
  queue.Full instead of piling up work) and the threads are daemons: a job stuck on a slow
  client or a runaway image does not keep the process from exiting on Ctrl-C.
  """

  def __init__(self, workers: int, max_pending: int, name: str):
    if workers < 1 or max_pending < 0:
      raise ValueError(f"a pool needs workers >= 1 and max_pending >= 0, got {workers} and "
                       f"{max_pending}")
    self.workers = workers
    self.max_pending = max_pending
    self._jobs: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._unfinished = 0  # Jobs submitted and not yet finished (or skipped once cancelled).
    self._closed = False
    self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                     for i in range(workers)]
    for thread in self._threads:
      thread.start()

  def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """Queues fn(*args); raises queue.Full when `workers + max_pending` jobs are unfinished."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    with self._lock:
      if self._closed:
        raise queue.Full("the pool is closed")
      if self._unfinished >= self.workers + self.max_pending:
        raise queue.Full(f"{self._unfinished} jobs are unfinished")
      self._unfinished += 1
      self._jobs.put((future, fn, args))
    return future

  def waiting(self) -> int:
    """How many jobs wait for a thread (roughly: cancelled ones count until skipped)."""
    return max(0, self._unfinished - self.workers)

  def _work(self) -> None:
    while (job := self._jobs.get()) is not None:
      future, fn, args = job
      try:
        if future.set_running_or_notify_cancel():
          try:
            future.set_result(fn(*args))
          except BaseException as e:  # pylint: disable=broad-except
            future.set_exception(e)  # Whoever waits on the future sees it.
      finally:
        with self._lock:
          self._unfinished -= 1

  def close(self) -> list[tuple[Any, ...]]:
    """Takes no more jobs and cancels the waiting ones; running jobs finish on their daemon
    threads, which then end. -> the arguments of the jobs that were cancelled."""
    with self._lock:
      self._closed = True
    cancelled = []
    while True:
      try:
        future, _, args = self._jobs.get_nowait()
      except queue.Empty:
        break
      if future.cancel():
        cancelled.append(args)
      with self._lock:
        self._unfinished -= 1
    for _ in self._threads:
      self._jobs.put(None)
    return cancelled


class _DeadlineReader(io.RawIOBase):
  """A socket's reading side that stops at a deadline: `timeout` seconds from its creation,
  or `busy_timeout` while `busy()` says others wait. (A socket timeout bounds each recv only,
  so a client that sends a byte every few seconds would hold its worker for ever.)"""

  def __init__(self, sock: socket.socket, timeout: float, busy_timeout: float,
               busy: Callable[[], bool]):
    super().__init__()
    self._sock = sock
    self._start = time.monotonic()
    self._timeout = timeout
    self._busy_timeout = min(busy_timeout, timeout)
    self._busy = busy
    self.limit = timeout  # The limit in force when a read last stopped, for messages.

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while True:
      self.limit = self._busy_timeout if self._busy() else self._timeout
      left = self._start + self.limit - time.monotonic()
      if left <= 0:
        raise TimeoutError(f"the request did not arrive within {self.limit:g} s")
      # Short waits, so that a read blocked when the server is idle still sees it get busy.
      self._sock.settimeout(min(left, _READ_POLL_SECONDS))
      try:
        return self._sock.recv_into(buffer)
      except TimeoutError:
        continue  # Nothing yet: look at the deadline again.


class DemoServer(HTTPServer):
  """The demo's HTTP server around a `predict.Reader` (see the module docstring for the API
  and the limits).

  Args:
    address: (host, port); port 0 picks a free one.
    reader: a `predict.Reader` (anything with `prepare` and `read_prepared` like it).
    max_request_bytes: larger bodies are refused with 413.
    max_pixels: larger images are refused with 400.
    workers: threads that serve connections.
    max_pending: accepted connections that may wait for a worker (beyond: 503 at once).
    read_timeout: seconds for a whole request to arrive once a worker takes it (beyond: 408).
    busy_read_timeout: the same while connections wait for a worker.
    request_timeout: seconds from a connection's arrival until the model starts reading its
      image (beyond: 503, or 504 when the preprocessing itself is what took too long).
    prepare_workers: threads that decode and preprocess images.
  """

  request_queue_size = BACKLOG  # The listen backlog; the stdlib's 5 dropped connections.

  def __init__(self, address: tuple[str, int], reader: predict.Reader, *,
               max_request_bytes: int = MAX_REQUEST_BYTES,
               max_pixels: int = preprocess.MAX_PIXELS, workers: int = WORKERS,
               max_pending: int = MAX_PENDING, read_timeout: float = READ_TIMEOUT,
               busy_read_timeout: float = BUSY_READ_TIMEOUT,
               request_timeout: float = REQUEST_TIMEOUT,
               prepare_workers: int = PREPARE_WORKERS):
    # Checked before binding, so that a wrong value leaves no open socket behind.
    if not (read_timeout > 0 and busy_read_timeout > 0 and request_timeout > 0):
      raise ValueError(f"read_timeout, busy_read_timeout and request_timeout must be positive, "
                       f"got {read_timeout}, {busy_read_timeout} and {request_timeout}")
    if workers < 1 or prepare_workers < 1 or max_pending < 0:
      raise ValueError(f"workers and prepare_workers must be at least 1 and max_pending at "
                       f"least 0, got {workers}, {prepare_workers} and {max_pending}")
    super().__init__(address, DemoHandler)  # Binds first: a busy port leaves no threads.
    self.reader = reader
    self.max_request_bytes = max_request_bytes
    self.max_pixels = max_pixels
    self.read_timeout = read_timeout
    self.busy_read_timeout = busy_read_timeout
    self.request_timeout = request_timeout
    self._lock = threading.Lock()  # The Reader and its compiled decoder serve one at a time.
    self._connections = WorkerPool(workers, max_pending, "demo-worker")
    # Each worker has at most one image in preparation; runaway ones fill the slack.
    self._preparing = WorkerPool(prepare_workers, workers, "demo-prepare")

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/"

  def info(self) -> dict[str, Any]:
    r = self.reader
    return {"height": r.height, "width": r.width, "max_digits": int(r.config.max_digits),
            "max_length": r.max_length - 1, "buckets": list(r.buckets),
            "beam_size": r.beam_size, "views": r.views, "step": int(r.step),
            "ensemble": len(r.ensemble),
            "max_request_bytes": self.max_request_bytes, "max_pixels": self.max_pixels}

  # -- Connections: a bounded pool instead of a thread each ------------------------------------

  def has_waiting(self) -> bool:
    """Whether connections wait for a worker (then requests get `busy_read_timeout`)."""
    return self._connections.waiting() > 0

  def process_request(self, request, client_address):
    """Hands the connection to a worker; called on serve_forever's thread, so never blocks."""
    try:
      self._connections.submit(self._process, request, client_address, time.monotonic())
    except queue.Full:
      log.info("%s refused: %d workers busy and %d connections waiting", client_address[0],
               self._connections.workers, self._connections.max_pending)
      try:
        request.setblocking(False)  # A fresh socket's send buffer takes the answer at once.
        request.send(_BUSY_RESPONSE)
      except OSError:
        pass
      socketserver.TCPServer.shutdown_request(self, request)  # No lingering on this thread.

  def _process(self, request, client_address, accepted: float) -> None:
    try:
      self.finish_request(request, client_address, accepted)
    except Exception:  # pylint: disable=broad-except
      self.handle_error(request, client_address)
    finally:
      self.shutdown_request(request)

  def finish_request(self, request, client_address, accepted: float | None = None):
    self.RequestHandlerClass(request, client_address, self, accepted=accepted)

  def shutdown_request(self, request):
    """Ends the answer, reads what the client still sends for a moment, then closes: closing
    with unread bytes would make the kernel reset the connection, and a reset can discard
    the answer before the client reads it (an error sent before the whole body came)."""
    try:
      request.shutdown(socket.SHUT_WR)
      deadline, drained = time.monotonic() + _LINGER_SECONDS, 0
      while drained < _LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
        request.settimeout(left)
        chunk = request.recv(2**16)
        if not chunk:
          break
        drained += len(chunk)
    except OSError:
      pass
    self.close_request(request)

  def handle_error(self, request, client_address):
    """One line for a client that went away; a logged traceback (not stderr) for a bug."""
    error = sys.exc_info()[1]
    if isinstance(error, _HANG_UPS + (TimeoutError,)):
      log.info("%s hung up (%s)", client_address[0], type(error).__name__)
    else:
      log.exception("Unexpected error while serving %s", client_address[0])

  def server_close(self):
    super().server_close()
    for request, *_ in self._connections.close():
      self.close_request(request)
    self._preparing.close()

  # -- Reading ----------------------------------------------------------------------------------

  def read(self, body: bytes, content_type: str,
           deadline: float | None = None) -> dict[str, Any]:
    """A /api/read body -> the reading's JSON; raises RequestError for what it refuses.

    Args:
      body, content_type: the request's.
      deadline: the time.monotonic() by which the model must have started reading (default:
        `request_timeout` from now).
    """
    if deadline is None:
      deadline = time.monotonic() + self.request_timeout
    data = image_bytes(body, content_type)
    start = time.perf_counter()
    canvas = self._prepare(data, deadline)
    # Only the model call holds the lock: preprocessing, however slow, never makes others wait.
    if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
      raise RequestError(503, "The model is busy with other readings and had no turn for this "
                         f"one within the {self.request_timeout:g} s limit; try again in a "
                         "moment.")
    try:
      prediction = self.reader.read_prepared([canvas], attention=True)[0]
    finally:
      self._lock.release()
    if prediction.error is not None:
      raise RequestError(400, prediction.error)
    out = reading_json(prediction)
    out["seconds"] = round(time.perf_counter() - start, 4)
    if prediction.no_ink:
      raise RequestError(422, NO_INK_MESSAGE, **out)
    return out

  def _prepare(self, data: bytes, deadline: float) -> np.ndarray | None:
    """Decodes and preprocesses an image file on the preparing pool, waiting until
    `deadline` at most (the job cannot be stopped: if late, it finishes unwatched)."""

    def prepare():
      image = preprocess.load_image(data, max_pixels=self.max_pixels)
      return self.reader.prepare([image])[0]

    busy = RequestError(503, "The server is busy preparing other images; try again in a "
                        "moment.")
    try:
      future = self._preparing.submit(prepare)
    except queue.Full:
      raise busy from None
    try:
      return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
      if future.cancel():
        raise busy from None
      if not future.done():
        raise RequestError(504, "Preparing the image took longer than the "
                           f"{self.request_timeout:g} s limit; send a smaller image, or one "
                           "of a usual shape (a line of digits).") from None
      return future.result()
    except preprocess.ImageError as e:
      raise RequestError(400, str(e)) from None


class DemoHandler(BaseHTTPRequestHandler):
  """GET serves the page and /api/info, POST /api/read reads an image; one log line each."""

  server: DemoServer
  server_version = "digit_vit-demo"
  # Nobody speaks HTTP/0.9 any more; with the stdlib's default a garbage request line would be
  # answered without a status line or headers.
  default_request_version = "HTTP/1.0"

  def __init__(self, request, client_address, server, *, accepted: float | None = None):
    # Set before BaseRequestHandler.__init__, which serves the whole request.
    self._accepted = time.monotonic() if accepted is None else accepted
    self._note = ""
    super().__init__(request, client_address, server)

  def setup(self):
    self.timeout = self.server.read_timeout  # Each send waits this long at most.
    super().setup()
    # And the whole request must arrive by a deadline: swap the reader for one that keeps it.
    self.rfile.close()
    self._reader = _DeadlineReader(self.connection, self.server.read_timeout,
                                   self.server.busy_read_timeout, self.server.has_waiting)
    self.rfile = io.BufferedReader(self._reader)

  def handle(self):
    try:
      super().handle()
    except _HANG_UPS as e:
      self.close_connection = True
      log.info("%s hung up during %s (%s)", self.address_string(),
               self._request_name(), type(e).__name__)

  def do_GET(self):  # pylint: disable=invalid-name
    path = urlsplit(self.path).path
    if path == "/api/info":
      self._send_json(200, self.server.info())
    elif path in ("/", "/index.html"):
      self._send_file("index.html")
    elif path.startswith("/static/"):
      self._send_file(path[len("/static/"):])
    else:
      self._send_json(404, {"error": f"No page {path}; the demo is at /."})

  do_HEAD = do_GET  # pylint: disable=invalid-name  (`_send` leaves the body out)

  def do_POST(self):  # pylint: disable=invalid-name
    path = urlsplit(self.path).path
    try:
      if path != "/api/read":
        raise RequestError(404, f"No endpoint {path}; POST images to /api/read.")
      body = self._read_body()
      status, payload = 200, self.server.read(
          body, self.headers.get("Content-Type", ""),
          deadline=self._accepted + self.server.request_timeout)
    except RequestError as e:
      status, payload = e.status, e.payload
    except Exception:  # pylint: disable=broad-except
      # The page gets a message, the log gets the traceback, and the server keeps serving.
      log.exception("Reading failed")
      status, payload = 500, {"error": "Internal error while reading the image; the server "
                                       "log has the details."}
    self._send_json(status, payload)

  def _method_not_allowed(self):
    self._send_json(405, {"error": f"{self.command} is not allowed: GET the page or "
                                   "/api/info, POST images to /api/read."})

  # pylint: disable-next=invalid-name
  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

  def send_error(self, code, message=None, explain=None):
    """http.server's own refusals (a malformed request line, an unknown method, a request line
    or header over its limits) in JSON, like every other answer of the API."""
    short, long = self.responses.get(code, ("Error", ""))
    error = message or (f"{short}: {long}" if long else short)
    if code == HTTPStatus.NOT_IMPLEMENTED:
      error += f"; this server answers {_ALLOWED_METHODS}"
    self.close_connection = True
    self._send_json(code, {"error": error})

  def _read_body(self) -> bytes:
    if self.headers.get("Transfer-Encoding"):
      raise RequestError(411, "Send the image with a Content-Length header (chunked uploads "
                         "are not accepted).")
    try:
      length = int(self.headers.get("Content-Length", ""))
    except ValueError:
      raise RequestError(411, "Send the image with a Content-Length header.") from None
    limit = self.server.max_request_bytes
    if length > limit:
      self._discard(length)
      raise RequestError(413, f"The upload is {_mib(length)}, over the {_mib(limit)} limit; "
                         f"send a smaller image (files up to about {_mib(limit * 3 // 4)}).")
    received = 0
    chunks = []
    try:
      while received < length:
        chunk = self.rfile.read1(min(length - received, 2**20))
        if not chunk:
          raise RequestError(400, f"The body ended after {received:,} of the {length:,} "
                             "bytes its Content-Length announced.")
        chunks.append(chunk)
        received += len(chunk)
    except TimeoutError:
      raise RequestError(408, f"The request did not arrive within the "
                         f"{self._reader.limit:g} s limit ({received:,} of {length:,} "
                         "body bytes came); send the whole request at once.") from None
    return b"".join(chunks)

  def _discard(self, length: int) -> None:
    """Reads an oversize body so the client sees the 413 rather than a reset connection."""
    if length > _MAX_DISCARD_BYTES:
      return  # Not worth reading: `shutdown_request` lingers a moment, then closes.
    try:
      while length > 0:
        chunk = self.rfile.read1(min(length, 2**20))
        if not chunk:
          break
        length -= len(chunk)
    except TimeoutError:
      pass  # The 413 goes out anyway; a client still sending may miss it.

  def _send_file(self, name: str) -> None:
    resource = _WEB / name
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _CONTENT_TYPES or \
        not resource.is_file():
      self._send_json(404, {"error": f"No file {name!r} in the demo page."})
      return
    self._send(200, resource.read_bytes(), _CONTENT_TYPES[suffix])

  def _send_json(self, status: int, payload: dict[str, Any]) -> None:
    self._note = (f"digits={payload['digits']!r} confidence={payload['confidence']:.3f}"
                  if status == 200 and "digits" in payload else payload.get("error", ""))
    self._send(status, json.dumps(payload).encode(), "application/json")

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    # The read deadline may have left the socket's timeout at a few milliseconds.
    self.connection.settimeout(self.server.read_timeout)
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.send_header("Content-Security-Policy", _CSP)
    self.send_header("X-Content-Type-Options", "nosniff")
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
      self.send_header("Allow", _ALLOWED_METHODS)
    elif status == HTTPStatus.SERVICE_UNAVAILABLE:
      self.send_header("Retry-After", "1")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)
    ms = 1000 * (time.monotonic() - self._accepted)
    log.info("%s %s %d %.0f ms %s", self.address_string(), self._request_name(), status, ms,
             self._note[:200])
    self._note = ""

  def _request_name(self) -> str:
    """'METHOD /path' for the log, as much of it as was parsed."""
    command, path = getattr(self, "command", None), getattr(self, "path", None)
    if command and path:
      return f"{command} {path[:200]}"
    line = getattr(self, "requestline", "")
    return repr(line[:80]) if line else "the request line"

  def log_request(self, code="-", size="-"):
    """Silent: `_send` logs each answered request, with its outcome."""

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    """http.server's own messages (timeouts): one log line, not stderr prints."""
    log.info("%s %s", self.address_string(), format % args)


def make_server(reader: predict.Reader, host: str = "127.0.0.1", port: int = 8000,
                **kwargs: Any) -> DemoServer:
  """A bound, not yet serving, DemoServer (port 0 picks a free port; see `server.url`).

  Run it with `server.serve_forever()` (on a thread in tests; stop with `server.shutdown()`
  and `server.server_close()`). kwargs: see `DemoServer` (`max_request_bytes`, `max_pixels`,
  `workers`, `max_pending`, `read_timeout`, `busy_read_timeout`, `request_timeout`,
  `prepare_workers`).
  """
  return DemoServer((host, port), reader, **kwargs)


def load_reader(workdir: str | None = None, *, model: str | None = None,
                beam_size: int | None = None, views: int | None = None,
                checkpoint: str | int = "best", ensemble: Sequence[str] = (),
                min_confidence: float = 0.0):
  """The demo's reader: the run in `workdir` (and the `ensemble` runs that read with it, see
  `predict.Reader`), or the exported reader in `model` (`serving.load`, with the persistent
  compilation cache on), or with neither the released reader (`predict.reader_source`); one
  image per request, so batch 1, the cheapest shape to compile. Either marks a reading below
  `min_confidence` `rejected`.

  Raises:
    ValueError: both workdir and model, or neither and no released reader; decoding options
      with an exported reader; a wrong run or export (FileNotFoundError for a missing run).
  """
  workdir, model = predict.reader_source(workdir, model)
  if model is not None:
    given = [name for name, value in (("--beam_size", beam_size), ("--views", views),
                                      ("--checkpoint", None if checkpoint == "best" else 1),
                                      ("--ensemble", ensemble or None)) if value is not None]
    if given:
      raise ValueError(f"{', '.join(given)} apply to --workdir only: an exported reader's "
                       "checkpoint and decoding were fixed when it was exported")
    from digit_vit import serving  # pylint: disable=import-outside-toplevel
    serving.enable_compilation_cache()
    return serving.load(model, batch_size=1, min_confidence=min_confidence)
  return predict.Reader(workdir, checkpoint=checkpoint, beam_size=beam_size, views=views,
                        batch_size=1, ensemble=ensemble, min_confidence=min_confidence)


def serve(workdir: str | None, host: str = "127.0.0.1", port: int = 8000, *,
          model: str | None = None, beam_size: int | None = None, views: int | None = None,
          checkpoint: str | int = "best", ensemble: Sequence[str] = (),
          min_confidence: float = 0.0, **server_kwargs: Any) -> None:
  """Loads the reader (`load_reader`: the run in `workdir`, or the exported reader in
  `model`), compiles the decoder once, and serves until Ctrl-C. server_kwargs: see
  `DemoServer`."""
  reader = load_reader(workdir, model=model, beam_size=beam_size, views=views,
                       checkpoint=checkpoint, ensemble=ensemble, min_confidence=min_confidence)
  try:
    server = make_server(reader, host, port, **server_kwargs)
  except OSError as e:
    raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                     "--port, or a --host of this machine") from None
  start = time.perf_counter()
  stroke = np.zeros((28, 28), np.float32)
  stroke[4:24, 12:16] = 1.0  # Any image with ink compiles the decoder before the first visitor.
  reader.read([stroke], attention=True)
  log.info("Loaded %s (step %d, beam %d, %d view(s), %d more model(s)); compiled in %.1f s.",
           workdir or getattr(reader, "directory", model), reader.step, reader.beam_size,
           reader.views, len(reader.ensemble), time.perf_counter() - start)
  log.info("Serving the demo at %s (Ctrl-C stops).", server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  # --min_confidence is 0 by default: the demo shows what the model reads; a threshold is the
  # user's choice of risk, and means something only for a run calibrated on its validation split.
  cli.define_reader_flags(flag_values, alpha=False, min_confidence=True)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 for all).",
                      flag_values=flag_values)
  flags.DEFINE_integer("port", 8000, "Port to listen on (0 picks a free one).",
                       flag_values=flag_values)
  flags.DEFINE_integer("workers", WORKERS, "Threads serving connections (more wait in a queue "
                       f"of {MAX_PENDING}, beyond it they are answered 503).", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_float("read_timeout", READ_TIMEOUT, "Seconds for a whole request to arrive.",
                     flag_values=flag_values)
  flags.DEFINE_float("request_timeout", REQUEST_TIMEOUT, "Seconds from a request's arrival "
                     "until the model starts reading it, or it is answered 503/504.",
                     flag_values=flag_values)
  for name in ("read_timeout", "request_timeout"):
    flags.register_validator(name, lambda seconds: seconds > 0, "expected a positive number of "
                             "seconds", flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> int:
  if len(argv) > 1:
    return cli.error(f"unexpected arguments {argv[1:]}", cli.USAGE)
  # Our own handler: the libraries' loggers may already have configured the root one.
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  logs.quiet_libraries()
  f = flag_values
  try:
    serve(f.workdir, f.host, f.port, model=f.model, beam_size=f.beam_size, views=f.views,
          checkpoint=f.checkpoint, ensemble=f.ensemble, min_confidence=f.min_confidence,
          workers=f.workers, read_timeout=f.read_timeout, request_timeout=f.request_timeout)
  except (FileNotFoundError, ValueError) as e:  # A wrong --workdir, --model, --checkpoint, --port
    return cli.error(str(e), cli.USAGE)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
