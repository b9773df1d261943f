// digit_vit draw-and-read demo: a drawing pad (pointer events, so mouse, pen and touch all
// draw), Classify / Clear / upload, and the reading the server returns from POST /api/read.
'use strict';

// Black strokes on white, about as thick relative to a digit drawn across most of the pad's
// height as MNIST strokes are: the server crops to the ink and scales it to the canvas.
const PEN_WIDTH = 14;
const INK = '#000';
const PAPER = '#fff';

const $ = (id) => document.getElementById(id);
const pad = $('pad');
const ctx = pad.getContext('2d');
const statusLine = $('status');
const buttons = [$('classify'), $('clear')];

let inked = false;   // Whether anything was drawn since the last Clear.
let stroke = null;   // The last point of the stroke in progress, in pad pixels.
let completed = 0;   // Finished actions; tests wait on status[data-seq] reaching a count.

function clearPad() {
  ctx.fillStyle = PAPER;
  ctx.fillRect(0, 0, pad.width, pad.height);
  inked = false;
}

// A pointer event's position in the pad's own pixels (the element is scaled by CSS).
function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: (event.clientX - box.left) * pad.width / box.width,
    y: (event.clientY - box.top) * pad.height / box.height,
  };
}

function drawTo(point) {
  ctx.beginPath();
  ctx.moveTo(stroke.x, stroke.y);
  ctx.lineTo(point.x, point.y);
  ctx.stroke();
  stroke = point;
}

function startStroke(event) {
  if (event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  ctx.strokeStyle = INK;
  ctx.lineWidth = PEN_WIDTH;
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  stroke = padPoint(event);
  drawTo({x: stroke.x + 0.01, y: stroke.y});  // A tap leaves a dot.
  inked = true;
}

function moveStroke(event) {
  if (stroke === null) return;
  event.preventDefault();
  // Coalesced events keep fast strokes smooth where the browser batches pointer moves.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of (events.length ? events : [event])) drawTo(padPoint(e));
}

function endStroke() {
  stroke = null;
}

function setStatus(state, message) {
  statusLine.dataset.state = state;
  statusLine.textContent = message;
}

// Ends an action (a reading or a refusal): the status line says how it went.
function finish(state, message) {
  completed += 1;
  setStatus(state, message);
  statusLine.dataset.seq = String(completed);
  buttons.forEach((b) => { b.disabled = false; });
  $('upload').disabled = false;
}

function showReading(reading) {
  const digits = $('digits');
  digits.dataset.digits = reading.digits;
  digits.textContent = reading.digits || '(none)';
  $('confidence').textContent = (100 * reading.confidence).toFixed(1) + '%';
  $('tokens').textContent = '[' + reading.tokens.join(', ') + ']';
  const names = $('token-names');
  names.replaceChildren(...reading.token_names.map((name) => {
    const item = document.createElement('li');
    item.textContent = name;
    if (name.startsWith('<')) item.className = 'special';
    return item;
  }));
  // The model stopped at its length limit, not at <eos>: the digits may be only the start.
  $('truncated').hidden = !reading.truncated;
  // Below the server's --min_confidence: shown, but flagged as not to be relied on.
  $('uncertain').hidden = !reading.rejected;
  $('canvas-image').src = reading.canvas;
  $('attention').src = reading.attention;
  $('result').hidden = false;
}

async function read(dataUrl, what) {
  buttons.forEach((b) => { b.disabled = true; });
  $('upload').disabled = true;
  setStatus('busy', `Reading ${what}…`);
  let response;
  let body;
  try {
    response = await fetch('/api/read', {
      method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({image: dataUrl}),
    });
  } catch (error) {
    finish('error', 'Cannot reach the demo server: is `python -m digit_vit.demo` still running?');
    return;
  }
  try {
    body = await response.json();
  } catch (error) {
    finish('error', `The server answered HTTP ${response.status} without a reading.`);
    return;
  }
  if (!response.ok) {
    finish('error', body.error || `The server answered HTTP ${response.status}.`);
    return;
  }
  showReading(body);
  finish('ok', `Read ${what} in ${Math.round(1000 * body.seconds)} ms.`);
}

function classify() {
  if (!inked) {
    finish('error', 'The drawing area is empty: draw some digits first.');
    pad.focus();
    return;
  }
  read(pad.toDataURL('image/png'), 'the drawing');
}

function readFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => read(reader.result, file.name);
  reader.onerror = () => finish('error', `Cannot open ${file.name}: ${reader.error}`);
  reader.readAsDataURL(file);
}

async function showModelInfo() {
  try {
    const info = await (await fetch('/api/info')).json();
    let decoding = info.beam_size > 1 ? `beam search (beam ${info.beam_size})` : 'greedy';
    if (info.views > 1) decoding += ` over ${info.views} shifted views`;
    if (info.ensemble > 0) decoding += ` with ${info.ensemble} more model(s) reading along`;
    $('model-info').textContent =
        `Model: checkpoint of step ${info.step}, trained on lines of 1 to ${info.max_digits} ` +
        `digits, reads up to ${info.max_length} digits on lines ${info.height} pixels high ` +
        `and up to ${info.width} wide, ${decoding} decoding.`;
    $('canvas-caption').textContent =
        `What the model saw: the line ${info.height} pixels high, at its own width.`;
  } catch (error) {
    $('model-info').textContent = 'Cannot reach the demo server.';
  }
}

pad.addEventListener('pointerdown', startStroke);
pad.addEventListener('pointermove', moveStroke);
pad.addEventListener('pointerup', endStroke);
pad.addEventListener('pointercancel', endStroke);
pad.addEventListener('dragover', (event) => event.preventDefault());
pad.addEventListener('drop', (event) => {
  event.preventDefault();
  readFile(event.dataTransfer.files[0]);
});
$('classify').addEventListener('click', classify);
$('clear').addEventListener('click', () => {
  clearPad();
  $('result').hidden = true;
  setStatus('idle', 'Cleared. Draw some digits, then press Classify.');
});
$('upload').addEventListener('change', (event) => {
  readFile(event.target.files[0]);
  event.target.value = '';  // Choosing the same file again reads it again.
});

clearPad();
showModelInfo();
