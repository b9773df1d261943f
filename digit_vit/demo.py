r"""Draw-and-read web demo: draw a line of digits with the mouse, a pen or a finger, press
Classify, and see what the model reads.

  python -m digit_vit.demo --workdir=runs/default [--host=127.0.0.1] [--port=8000] \
      [--beam_size=4] [--views=5] [--checkpoint=best] [--ensemble=RUN[@CHECKPOINT],...]

then open the printed address in a browser. The page (digit_vit/web/) is served from this
process with no asset from the internet, so the demo runs offline. It shows the raw tokens
(e.g. [1, 0, 1, 11, 12, ...]), the digits, the confidence, the model's input canvas and the
attention map of every output token; an image file can be uploaded instead of drawn.

HTTP interface (all JSON except the page itself):

  GET  /               the page; GET /static/NAME: its script and style
  GET  /api/info       {"height", "width", "max_digits", "beam_size", "views", "step",
                        "ensemble" (how many more models read along), "max_request_bytes",
                        "max_pixels"}
  POST /api/read       body {"image": "data:image/png;base64,..."} (or the raw image bytes)
    200  {"digits": "101", "tokens": [1, 0, 1, 11, 12, ...], "token_names": ["1", ...],
          "confidence": 0.93, "log_prob": -0.07, "no_ink": false, "seconds": 0.04,
          "canvas": PNG data URL of the model input [H, W],
          "attention": PNG data URL of `predict.attention_overlay` (one row per token)}
    400  {"error": ...} malformed JSON, no "image", bad base64, not an image, too many pixels
    411 / 413  {"error": ...} no Content-Length / body over `max_request_bytes`
    422  {"error": "... draw some digits first ...", + the empty reading} an image with no ink

Requests are served on threads; the model call is behind a lock (one compiled decoder), and
each request is logged on one line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib.resources
import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from digit_vit import logs, predict, trained
from digit_vit.models import tokens

log = logging.getLogger("digit_vit.demo")

# A drawing from the page is a few tens of KB; 8 MiB of base64 holds a 6 MiB photo.
MAX_REQUEST_BYTES = 8 * 2**20
# Larger bodies are not even read to the end: the connection is closed instead.
_MAX_DISCARD_BYTES = 64 * 2**20
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
         "no_ink": prediction.no_ink, "canvas": None, "attention": None}
  if prediction.canvas is not None:
    out["canvas"] = png_data_url(prediction.canvas)
  if prediction.attention is not None:
    out["attention"] = png_data_url(predict.attention_overlay(prediction))
  return out


class DemoServer(ThreadingHTTPServer):
  """The demo's HTTP server around a `predict.Reader` (see the module docstring for the API)."""

  daemon_threads = True  # Ctrl-C does not wait for open connections.

  def __init__(self, address: tuple[str, int], reader: predict.Reader, *,
               max_request_bytes: int = MAX_REQUEST_BYTES,
               max_pixels: int = predict.MAX_PIXELS):
    super().__init__(address, DemoHandler)
    self.reader = reader
    self.max_request_bytes = max_request_bytes
    self.max_pixels = max_pixels
    self._lock = threading.Lock()  # The Reader and its compiled decoder serve one at a time.

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/"

  def info(self) -> dict[str, Any]:
    r = self.reader
    return {"height": r.height, "width": r.width, "max_digits": int(r.config.max_digits),
            "beam_size": r.beam_size, "views": r.views, "step": int(r.step),
            "ensemble": len(r.ensemble),
            "max_request_bytes": self.max_request_bytes, "max_pixels": self.max_pixels}

  def read(self, body: bytes, content_type: str) -> dict[str, Any]:
    """A /api/read body -> the reading's JSON; raises RequestError for what it refuses."""
    try:
      image = predict.load_image(image_bytes(body, content_type), max_pixels=self.max_pixels)
    except predict.ImageError as e:
      raise RequestError(400, str(e)) from None
    start = time.perf_counter()
    with self._lock:
      prediction = self.reader.read([image], attention=True)[0]
    if prediction.error is not None:
      raise RequestError(400, prediction.error)
    out = reading_json(prediction)
    out["seconds"] = round(time.perf_counter() - start, 4)
    if prediction.no_ink:
      raise RequestError(422, NO_INK_MESSAGE, **out)
    return out


class DemoHandler(BaseHTTPRequestHandler):
  """GET serves the page and /api/info, POST /api/read reads an image; one log line each."""

  server: DemoServer
  server_version = "digit_vit-demo"

  def do_GET(self):  # pylint: disable=invalid-name
    self._start = time.perf_counter()
    path = urlsplit(self.path).path
    if path == "/api/info":
      self._send_json(200, self.server.info())
    elif path in ("/", "/index.html"):
      self._send_file("index.html")
    elif path.startswith("/static/"):
      self._send_file(path[len("/static/"):])
    else:
      self._send_json(404, {"error": f"No page {path}; the demo is at /."})

  def do_POST(self):  # pylint: disable=invalid-name
    self._start = time.perf_counter()
    path = urlsplit(self.path).path
    try:
      if path != "/api/read":
        raise RequestError(404, f"No endpoint {path}; POST images to /api/read.")
      body = self._read_body()
      status, payload = 200, self.server.read(body, self.headers.get("Content-Type", ""))
    except RequestError as e:
      status, payload = e.status, e.payload
    except Exception:  # pylint: disable=broad-except
      # The page gets a message, the log gets the traceback, and the server keeps serving.
      log.exception("Reading failed")
      status, payload = 500, {"error": "Internal error while reading the image; the server "
                                       "log has the details."}
    self._send_json(status, payload)

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
    return self.rfile.read(max(length, 0))

  def _discard(self, length: int) -> None:
    """Reads an oversize body so the client sees the 413 rather than a reset connection."""
    if length > _MAX_DISCARD_BYTES:
      self.close_connection = True
      return
    while length > 0:
      chunk = self.rfile.read(min(length, 2**20))
      if not chunk:
        break
      length -= len(chunk)

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
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.send_header("Content-Security-Policy", _CSP)
    self.send_header("X-Content-Type-Options", "nosniff")
    self.end_headers()
    self.wfile.write(body)
    ms = 1000 * (time.perf_counter() - self._start)
    log.info("%s %s %s %d %.0f ms %s", self.address_string(), self.command, self.path, status,
             ms, getattr(self, "_note", "")[:200])
    self._note = ""

  def log_request(self, code="-", size="-"):
    """Silent: `_send` logs each answered request, with its outcome."""

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    """http.server's own messages (malformed requests): one log line, not stderr prints."""
    log.info("%s %s", self.address_string(), format % args)


def make_server(reader: predict.Reader, host: str = "127.0.0.1", port: int = 8000,
                **kwargs: Any) -> DemoServer:
  """A bound, not yet serving, DemoServer (port 0 picks a free port; see `server.url`).

  Run it with `server.serve_forever()` (on a thread in tests; stop with `server.shutdown()`
  and `server.server_close()`). kwargs: `max_request_bytes`, `max_pixels`.
  """
  return DemoServer((host, port), reader, **kwargs)


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000, *,
          beam_size: int | None = None, views: int | None = None,
          checkpoint: str | int = "best", ensemble: Sequence[str] = ()) -> None:
  """Loads the run in `workdir` (and the `ensemble` runs that read with it, see
  `predict.Reader`), compiles the decoder once, and serves until Ctrl-C."""
  # One image per request: batch 1 is the cheapest fixed shape for the compiled decoder.
  reader = predict.Reader(workdir, checkpoint=checkpoint, beam_size=beam_size, views=views,
                          batch_size=1, ensemble=ensemble)
  try:
    server = make_server(reader, host, port)
  except OSError as e:
    raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                     "--port, or a --host of this machine") from None
  start = time.perf_counter()
  stroke = np.zeros((28, 28), np.float32)
  stroke[4:24, 12:16] = 1.0  # Any image with ink compiles the decoder before the first visitor.
  reader.read([stroke], attention=True)
  log.info("Loaded %s (step %d, beam %d, %d view(s), %d more model(s)); compiled in %.1f s.",
           workdir, reader.step, reader.beam_size, reader.views, len(reader.ensemble),
           time.perf_counter() - start)
  log.info("Serving the demo at %s (Ctrl-C stops).", server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


def _checkpoint(value: str) -> str | int:
  try:
    return trained.parse_checkpoint(value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m digit_vit.demo",
      description="Serve a page where you draw digits (or upload an image) and see the model "
                  "read them: raw tokens, digits, confidence and attention maps.")
  parser.add_argument("--workdir", required=True,
                      help="a training run's directory (config.json and checkpoints/)")
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default %(default)s; 0.0.0.0 for all)")
  parser.add_argument("--port", type=int, default=8000,
                      help="port to listen on (default %(default)s; 0 picks a free one)")
  parser.add_argument("--beam_size", type=int, default=None,
                      help="beam size (default: the run's config.decode; 1 = greedy)")
  parser.add_argument("--views", type=int, default=None,
                      help="test-time shifted views averaged per token (default: the run's "
                           "config.decode; 1 = the image alone)")
  parser.add_argument("--checkpoint", type=_checkpoint, default="best",
                      help="'best' (by validation, the default), 'latest' or a step")
  parser.add_argument("--ensemble", type=_run_list, default=[],
                      help="further runs that read with --workdir's model, comma-separated "
                           "WORKDIR or WORKDIR@CHECKPOINT: each token by the models' mean "
                           "probability")
  return parser.parse_args(argv)


def _run_list(value: str) -> list[str]:
  return [run for run in value.split(",") if run]


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  # Our own handler: the libraries' loggers may already have configured the root one.
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  logs.quiet_libraries()
  try:
    serve(args.workdir, args.host, args.port, beam_size=args.beam_size, views=args.views,
          checkpoint=args.checkpoint, ensemble=args.ensemble)
  except (FileNotFoundError, ValueError) as e:  # A wrong --workdir, --checkpoint or --port.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
