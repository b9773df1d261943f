r"""Load and abuse check of the web demo (`python -m digit_vit.demo`): concurrent reads, slow
clients, and malformed or hostile requests; prints what the server held.

  python -m digit_vit.demo_load --workdir=/tmp/tiny_demo_run [--server_args="--workers=32"]
      starts a demo of that run on a free loopback port, measures it, and stops it (its log is
      scanned for tracebacks);
  python -m digit_vit.demo_load --url=http://127.0.0.1:8000/
      measures a demo that is already running on this machine.

Three phases, each reported on its own:
  reads   --reads POSTs of a drawing over --concurrency threads that start together: how many
          were answered 200 and the latency (p50, p95, max).
  slow    --slow_clients sockets that announce a body (--slow_announce bytes) and send only
          --slow_send bytes of it, held open: how many the server cut off and how fast, what
          it answered them, and when a normal read sent meanwhile was answered 200.
  abuse   one of each malformed or hostile request (a garbage request line, PUT, an unknown
          method, huge URI and headers, no Content-Length, bad JSON, not an image, too many
          pixels, an oversize body, extreme aspect ratios, a hang-up mid-request...): each
          answer's status, whether it is JSON, and its time; then a normal read.

Bounded by design: it speaks to loopback addresses only; --reads is at most 10,000 over at most
256 threads, --slow_clients at most 1,000 sockets; every socket has a timeout and each phase
stops at --time_limit seconds.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import ipaddress
import json
import re
import selectors
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from digit_vit import cli

MAX_READS = 10_000
MAX_CONCURRENCY = 256
MAX_SLOW_CLIENTS = 1_000
_RECV = 2**16


@dataclasses.dataclass
class Response:
  """An HTTP answer as read off the socket (status None: none came; `error`: why)."""
  status: int | None = None
  headers: dict[str, str] = dataclasses.field(default_factory=dict)
  body: bytes = b""
  seconds: float = 0.0
  connect_seconds: float | None = None
  error: str | None = None

  @property
  def is_json(self) -> bool:
    if not self.headers.get("content-type", "").startswith("application/json"):
      return False
    try:
      return isinstance(json.loads(self.body), dict)
    except ValueError:
      return False

  def json(self) -> dict[str, Any]:
    return json.loads(self.body)


def parse_response(data: bytes) -> Response:
  """Raw bytes of an HTTP/1.x answer -> Response (status None when there is no status line)."""
  head, _, body = data.partition(b"\r\n\r\n")
  lines = head.decode("iso-8859-1").split("\r\n")
  match = re.match(r"HTTP/\d\.\d (\d{3})", lines[0])
  if not match:
    return Response(body=data, error="no HTTP status line" if data else "no answer")
  headers = {}
  for line in lines[1:]:
    name, _, value = line.partition(":")
    headers[name.strip().lower()] = value.strip()
  return Response(status=int(match.group(1)), headers=headers, body=body)


def check_loopback(host: str) -> None:
  """Raises ValueError unless `host` is (or resolves only to) this machine."""
  try:
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
  except socket.gaierror as e:
    raise ValueError(f"cannot resolve {host!r}: {e}") from None
  for info in infos:
    if not ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback:
      raise ValueError(f"{host!r} is not a loopback address: this tool only loads a demo "
                       "on this machine (127.0.0.1)")


def exchange(address: tuple[str, int], data: bytes, *, timeout: float = 30.0,
             connect_timeout: float | None = None, hang_up: bool = False) -> Response:
  """Sends `data` on a fresh connection and reads the answer until the server closes.

  Args:
    address: the demo's (host, port).
    data: the whole request, as bytes (sent even if malformed).
    timeout: seconds for the whole exchange.
    connect_timeout: seconds for the connection to open (default `timeout`). A full listen
      backlog shows here: the kernel drops the handshake and the client retries after 1 s.
    hang_up: reset the connection right after sending (SO_LINGER 0), reading nothing.
  """
  start = time.monotonic()
  deadline = start + timeout
  chunks = []
  connected = None
  try:
    with socket.create_connection(address, timeout=connect_timeout or timeout) as sock:
      connected = time.monotonic() - start
      try:
        sock.sendall(data)
      except OSError:
        pass  # The server may answer (413, 431...) and close before taking it all.
      if hang_up:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return Response(seconds=time.monotonic() - start, connect_seconds=connected,
                        error="hung up")
      while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        chunk = sock.recv(_RECV)
        if not chunk:
          break
        chunks.append(chunk)
      else:
        raise TimeoutError("no end of the answer")
  except OSError as e:
    if not chunks:
      what = type(e).__name__ if connected is not None else f"connect: {type(e).__name__}"
      return Response(seconds=time.monotonic() - start, connect_seconds=connected, error=what)
  response = parse_response(b"".join(chunks))
  response.seconds = time.monotonic() - start
  response.connect_seconds = connected
  return response


def http_request(method: str, path: str, body: bytes = b"", *,
                 content_type: str = "application/json",
                 headers: Sequence[str] = ()) -> bytes:
  """A well-formed HTTP/1.1 request with Content-Length, as bytes."""
  lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
  if body or method == "POST":
    lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
  lines += list(headers)
  return ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1") + body


def png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def drawing_png() -> bytes:
  """What the page sends: black strokes ("170") on an 800 x 200 white pad."""
  image = Image.new("RGB", (800, 200), "white")
  draw = ImageDraw.Draw(image)
  draw.line([(160, 30), (160, 170)], fill="black", width=14)
  draw.line([(280, 40), (400, 40), (320, 170)], fill="black", width=14, joint="curve")
  draw.ellipse([(510, 30), (610, 170)], outline="black", width=14)
  return png(image)


def read_body(image_file: bytes) -> bytes:
  """The JSON body of POST /api/read, as the page sends it."""
  return json.dumps({"image": "data:image/png;base64,"
                     + base64.b64encode(image_file).decode("ascii")}).encode()


def read_request(image_file: bytes) -> bytes:
  return http_request("POST", "/api/read", read_body(image_file))


def _percentile(values: Sequence[float], q: float) -> float | None:
  return float(np.percentile(values, q)) if values else None


# ----------------------------------------------------------------------------------------------
# Phases


def concurrent_reads(address: tuple[str, int], *, concurrency: int = 40, reads: int = 40,
                     timeout: float = 60.0, connect_timeout: float = 5.0,
                     time_limit: float = 120.0) -> dict[str, Any]:
  """`reads` POSTs of a drawing over `concurrency` threads released together."""
  concurrency = min(concurrency, reads, MAX_CONCURRENCY)
  reads = min(reads, MAX_READS)
  request = read_request(drawing_png())
  start_gate = threading.Barrier(concurrency + 1)
  lock = threading.Lock()
  results: list[Response] = []
  next_read = [0]
  stop_at = [0.0]

  def client():
    start_gate.wait()
    while True:
      with lock:
        if next_read[0] >= reads or time.monotonic() > stop_at[0]:
          return
        next_read[0] += 1
      response = exchange(address, request, timeout=timeout, connect_timeout=connect_timeout)
      with lock:
        results.append(response)

  threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
  for thread in threads:
    thread.start()
  start = time.monotonic()
  stop_at[0] = start + time_limit
  start_gate.wait()
  for thread in threads:
    thread.join(timeout=max(0.0, stop_at[0] + timeout - time.monotonic()))
  wall = time.monotonic() - start
  with lock:
    done = list(results)
  ok = [r for r in done if r.status == 200 and r.is_json]
  errors = Counter(str(r.status) if r.status else r.error for r in done if r not in ok)
  latencies = [r.seconds for r in ok]
  connects = [r.connect_seconds for r in done if r.connect_seconds is not None]
  return {"concurrency": concurrency, "sent": len(done), "ok": len(ok),
          "errors": dict(errors), "connect_max_s": max(connects, default=None),
          "p50_s": _percentile(latencies, 50),
          "p95_s": _percentile(latencies, 95), "max_s": max(latencies, default=None),
          "wall_s": wall, "reads_per_s": len(ok) / wall if wall else None}


def slow_clients(address: tuple[str, int], *, clients: int = 300, announce: int = 10**7,
                 send: int = 10, timeout: float = 120.0,
                 probe_every: float = 0.5) -> dict[str, Any]:
  """Opens `clients` connections that announce `announce` body bytes and send `send`, and holds
  them; meanwhile a normal read is sent every `probe_every` s until one is answered 200."""
  clients = min(clients, MAX_SLOW_CLIENTS)
  head = (f"POST /api/read HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
          f"Content-Length: {announce}\r\n\r\n").encode() + b"{" * send
  probe = read_request(drawing_png())
  start = time.monotonic()
  deadline = start + timeout
  probes: list[tuple[float, Response]] = []
  stop_probing = threading.Event()

  def prober():
    while not stop_probing.is_set() and time.monotonic() < deadline:
      sent = time.monotonic() - start
      response = exchange(address, probe, timeout=max(0.1, deadline - time.monotonic()))
      probes.append((sent, response))
      if response.status == 200:
        return
      stop_probing.wait(probe_every)

  open_socks: dict[socket.socket, float] = {}
  outcomes: Counter = Counter()
  cut_off_after: list[float] = []
  probe_thread = threading.Thread(target=prober, daemon=True)
  selector = selectors.DefaultSelector()
  try:
    for _ in range(clients):
      if time.monotonic() > deadline:
        break
      try:
        sock = socket.create_connection(address, timeout=5.0)
        sock.sendall(head)
      except OSError as e:
        outcomes[f"connect: {type(e).__name__}"] += 1
        continue
      sock.setblocking(False)
      open_socks[sock] = time.monotonic()
      selector.register(sock, selectors.EVENT_READ)
    connected = len(open_socks)
    probe_thread.start()
    received: dict[socket.socket, bytes] = {s: b"" for s in open_socks}
    pending = dict(open_socks)
    while pending and time.monotonic() < deadline:
      for key, _ in selector.select(timeout=0.2):
        sock = key.fileobj
        error = None
        try:
          chunk = sock.recv(_RECV)
        except BlockingIOError:
          continue
        except OSError as e:
          chunk, error = b"", type(e).__name__
        if chunk:
          received[sock] += chunk
          continue
        # The server closed it: with an answer, or none.
        selector.unregister(sock)
        cut_off_after.append(time.monotonic() - pending.pop(sock))
        answer = parse_response(received[sock])
        outcomes[str(answer.status) if answer.status else (error or "closed, no answer")] += 1
    if pending:
      outcomes["still open at the time limit"] += len(pending)
    probe_thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
  finally:
    stop_probing.set()
    selector.close()
    for sock in open_socks:
      sock.close()
  first_ok = next(((sent, r) for sent, r in probes if r.status == 200), None)
  return {"clients": clients, "announced_bytes": announce, "sent_bytes": send,
          "connected": connected, "cut_off": len(cut_off_after),
          "cut_off_max_s": max(cut_off_after, default=None),
          "cut_off_p50_s": _percentile(cut_off_after, 50),
          "outcomes": dict(outcomes),
          "probes": [(round(sent, 2), r.status or r.error, round(r.seconds, 3))
                     for sent, r in probes],
          "normal_read_ok_after_s": None if first_ok is None
          else round(first_ok[0] + first_ok[1].seconds, 3)}


def _oblong(height: int, width: int) -> bytes:
  """A dark stroke pattern over a white strip of the given size."""
  x = np.full((height, width), 255, np.uint8)
  x[height // 4: max(height // 4 + 1, 3 * height // 4), ::7] = 0
  return png(Image.fromarray(x))


def abuse_cases() -> dict[str, Callable[[], tuple[bytes, bool]]]:
  """name -> a maker of (request bytes, hang up after sending)."""
  drawing = drawing_png()
  post = lambda body, **kw: http_request("POST", "/api/read", body, **kw)  # noqa: E731
  return {
      "garbage request line": lambda: (b"GARBAGE\r\n\r\n", False),
      "binary junk": lambda: (bytes(range(256)) * 8 + b"\r\n\r\n", False),
      "PUT /api/read": lambda: (http_request("PUT", "/api/read", b"hello"), False),
      "DELETE /": lambda: (http_request("DELETE", "/"), False),
      "unknown method BREW": lambda: (b"BREW /coffee HTTP/1.1\r\nHost: x\r\n\r\n", False),
      "HTTP/2.0 request line": lambda: (b"GET / HTTP/2.0\r\n\r\n", False),
      "bad HTTP version": lambda: (b"GET / HTTP/one\r\n\r\n", False),
      "70 KB URI": lambda: (http_request("GET", "/" + "a" * 70_000), False),
      "70 KB header line": lambda: (http_request("GET", "/", headers=["X-Big: " + "b" * 70_000]),
                                    False),
      "120 headers": lambda: (http_request("GET", "/", headers=[f"X-{i}: {i}"
                                                                 for i in range(120)]), False),
      "POST without Content-Length": lambda: (b"POST /api/read HTTP/1.1\r\nHost: x\r\n\r\n{}",
                                              False),
      "chunked upload": lambda: (b"POST /api/read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                 b"chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", False),
      "malformed JSON": lambda: (post(b'{"image": "data:image/png;base64,'), False),
      "JSON without image": lambda: (post(b'{"picture": 1}'), False),
      "bad base64": lambda: (post(b'{"image": "data:image/png;base64,@@@"}'), False),
      "not an image": lambda: (post(read_body(b"GIF89a, or so it says")), False),
      "truncated PNG": lambda: (post(read_body(drawing[:len(drawing) // 2])), False),
      "empty canvas": lambda: (post(read_body(png(Image.new("L", (800, 200), 255)))), False),
      "1x1 image": lambda: (post(read_body(png(Image.new("L", (1, 1), 0)))), False),
      "56 Mpx image": lambda: (post(read_body(png(Image.new("L", (8000, 7000), 255)))), False),
      "1 x 60000 strip": lambda: (post(read_body(_oblong(1, 60_000))), False),
      "60000 x 1 strip": lambda: (post(read_body(_oblong(60_000, 1))), False),
      "40 x 8000 strip (200:1)": lambda: (post(read_body(_oblong(40, 8_000))), False),
      "oversize body (8 MiB + 1)": lambda: (post(b"x" * (8 * 2**20 + 1)), False),
      "Content-Length 10 GB, no body": lambda: (
          b"POST /api/read HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n", False),
      "short body (announces 1000, sends 10)": lambda: (
          b"POST /api/read HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
          False),
      "raw PNG body": lambda: (post(drawing, content_type="image/png"), False),
      "hang-up right after a read request": lambda: (read_request(drawing), True),
  }


def abuse(address: tuple[str, int], *, timeout: float = 60.0) -> dict[str, Any]:
  """Each of `abuse_cases` once, then a normal read."""
  results = {}
  for name, make in abuse_cases().items():
    data, hang_up = make()
    r = exchange(address, data, timeout=timeout, hang_up=hang_up)
    error = r.json().get("error", "") if r.is_json else ""
    results[name] = {"status": r.status or r.error, "json": r.is_json,
                     "seconds": round(r.seconds, 3), "error": error[:100]}
  time.sleep(0.5)  # Lets the server notice the hang-up before the last check.
  r = exchange(address, read_request(drawing_png()), timeout=timeout)
  return {"cases": results,
          "normal_read_after": {"status": r.status or r.error, "json": r.is_json,
                                "seconds": round(r.seconds, 3)}}


# ----------------------------------------------------------------------------------------------
# A demo server of our own


class _DemoProcess:
  """`python -m digit_vit.demo --workdir=... --port=0` on loopback, its log collected."""

  def __init__(self, workdir: str, server_args: Sequence[str], startup_timeout: float):
    command = [sys.executable, "-m", "digit_vit.demo", f"--workdir={workdir}",
               "--host=127.0.0.1", "--port=0", *server_args]
    self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
    self.lines: list[str] = []
    ready = threading.Event()
    self.url = None

    def collect():
      for line in self.process.stdout:
        self.lines.append(line.rstrip("\n"))
        match = re.search(r"Serving the demo at (http://\S+/)", line)
        if match:
          self.url = match.group(1)
          ready.set()
      ready.set()  # It ended.

    threading.Thread(target=collect, daemon=True).start()
    if not ready.wait(startup_timeout) or self.url is None:
      self.stop()
      raise RuntimeError("the demo did not start:\n" + "\n".join(self.lines[-20:]))

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.send_signal(2)  # SIGINT: the demo's Ctrl-C path closes the server.
      try:
        self.process.wait(timeout=15)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait(timeout=15)


def _format(report: dict[str, Any]) -> str:
  lines = []
  if "reads" in report:
    r = report["reads"]
    p = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    lines += [f"reads: {r['ok']}/{r['sent']} answered 200 at concurrency {r['concurrency']}; "
              f"errors {r['errors'] or 'none'}; p50 {p(r['p50_s'])}, p95 {p(r['p95_s'])}, "
              f"max {p(r['max_s'])}; slowest connect {p(r['connect_max_s'])}; "
              f"{r['reads_per_s']:.1f} reads/s over {r['wall_s']:.1f} s"]
  if "slow" in report:
    s = report["slow"]
    lines += [f"slow clients: {s['cut_off']}/{s['clients']} cut off by the server (announced "
              f"{s['announced_bytes']:,} bytes, sent {s['sent_bytes']}), p50 "
              f"{s['cut_off_p50_s']} s, last after {s['cut_off_max_s']} s; outcomes "
              f"{s['outcomes']}; normal read answered 200 after {s['normal_read_ok_after_s']} s"
              f" (probes: {s['probes'][:6]}{' ...' if len(s['probes']) > 6 else ''})"]
  if "abuse" in report:
    a = report["abuse"]
    lines.append("abuse:")
    for name, c in a["cases"].items():
      lines.append(f"  {name:40s} {c['status']!s:>22} json={c['json']!s:5} "
                   f"{1000 * c['seconds']:7.0f} ms  {c['error']}")
    n = a["normal_read_after"]
    lines.append(f"  {'normal read afterwards':40s} {n['status']!s:>22} json={n['json']!s:5} "
                 f"{1000 * n['seconds']:7.0f} ms")
  if "server_log" in report:
    lines.append(f"server log: {report['server_log']}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  f = flag_values
  flags.DEFINE_string("url", None, "A running demo on this machine, e.g. "
                      "http://127.0.0.1:8000/.", flag_values=f)
  flags.DEFINE_string("workdir", None, "Start a demo of this run on a free loopback port.",
                      flag_values=f)
  flags.mark_flags_as_mutual_exclusive(["url", "workdir"], required=True, flag_values=f)
  flags.DEFINE_string("server_args", "", "More flags for the demo started with --workdir, e.g. "
                      "'--workers=8'.", flag_values=f)
  flags.DEFINE_string("phases", "reads,slow,abuse", "Comma-separated: reads, slow, abuse.",
                      flag_values=f)
  flags.DEFINE_integer("concurrency", 40, "Threads that send the reads.", lower_bound=1,
                       upper_bound=MAX_CONCURRENCY, flag_values=f)
  flags.DEFINE_integer("reads", 200, "Reads sent.", lower_bound=1, upper_bound=MAX_READS,
                       flag_values=f)
  flags.DEFINE_integer("slow_clients", 300, "Slow clients held open.", lower_bound=0,
                       upper_bound=MAX_SLOW_CLIENTS, flag_values=f)
  flags.DEFINE_integer("slow_announce", 10**7, "The Content-Length the slow clients announce "
                       "(10 MB).", lower_bound=1, upper_bound=10**12, flag_values=f)
  flags.DEFINE_integer("slow_send", 10, "The body bytes they send.", lower_bound=0,
                       upper_bound=10**6, flag_values=f)
  flags.DEFINE_float("time_limit", 180.0, "Seconds per phase at most.", lower_bound=1,
                     upper_bound=3600, flag_values=f)
  flags.DEFINE_string("json", None, "Also write the report to this file.", flag_values=f)


def main(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> int:
  if len(argv) > 1:
    return cli.error(f"unexpected arguments {argv[1:]}", cli.USAGE)
  args = flag_values
  phases = {p.strip() for p in args.phases.split(",") if p.strip()}
  unknown = phases - {"reads", "slow", "abuse"}
  if unknown:
    return cli.error(f"unknown phases {sorted(unknown)}", cli.USAGE)
  server = None
  try:
    if args.workdir:
      server = _DemoProcess(args.workdir, shlex.split(args.server_args), startup_timeout=600)
      url = server.url
    else:
      url = args.url
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
      raise ValueError(f"expected a URL such as http://127.0.0.1:8000/, got {url!r}")
    check_loopback(parts.hostname)
    address = (parts.hostname, parts.port or 80)
    report: dict[str, Any] = {"url": url}
    if "reads" in phases:
      report["reads"] = concurrent_reads(address, concurrency=args.concurrency, reads=args.reads,
                                         time_limit=args.time_limit)
    if "slow" in phases and args.slow_clients:
      report["slow"] = slow_clients(address, clients=args.slow_clients,
                                    announce=args.slow_announce, send=args.slow_send,
                                    timeout=args.time_limit)
    if "abuse" in phases:
      report["abuse"] = abuse(address)
  except (ValueError, RuntimeError) as e:  # Its own demo's log lines follow a RuntimeError's.
    print(f"error: {e}", file=sys.stderr)
    return cli.USAGE
  finally:
    if server is not None:
      server.stop()
  if server is not None:
    time.sleep(0.2)  # The log collector reads the last lines.
    report["server_log"] = {
        "lines": len(server.lines),
        "tracebacks": sum("Traceback" in line for line in server.lines),
        "hang_up_lines": sum("hung up" in line for line in server.lines),
        "refused_lines": sum(" refused: " in line for line in server.lines)}
  print(_format(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
