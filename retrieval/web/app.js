// sketch2medi draw-to-search page: a canvas the clinician draws on, sent as a PNG to /api/search.
// No libraries and nothing from other hosts: it runs offline against the local server.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const template = $("template");
const LIVE_DELAY_MS = 600; // after the last stroke: a pause, not every pointer lift mid-drawing

const state = {
  tool: "pen",
  items: [],        // what is drawn, in order: {kind: "stroke", tool, width, points} or {kind: "image", bitmap}
  current: null,    // the stroke under the pointer
  pointer: null,    // the one pointer drawing it (a second finger is ignored)
  seq: 0,           // only the newest search's answer is shown
  controller: null,
  timer: null,
  results: [],
};

function setStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

// -- drawing ----------------------------------------------------------------------------------

function toCanvas(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
}

function fitInto(context, bitmap) {
  // Contain the picture in the square canvas, centred, as a sketch is padded to a square anyway.
  const { width, height } = context.canvas;
  const scale = Math.min(width / bitmap.width, height / bitmap.height);
  const w = bitmap.width * scale, h = bitmap.height * scale;
  context.drawImage(bitmap, (width - w) / 2, (height - h) / 2, w, h);
}

function stylePen(item) {
  // The eraser removes ink from the drawing layer, so the template below shows through again.
  ctx.globalCompositeOperation = item.tool === "eraser" ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = "#000";
  ctx.lineWidth = item.width;
  ctx.lineCap = ctx.lineJoin = "round";
}

function drawSegment(item, from, to) {
  stylePen(item);
  ctx.beginPath();
  if (from === to) {
    ctx.arc(to[0], to[1], item.width / 2, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
  }
  ctx.globalCompositeOperation = "source-over";
}

function drawItem(item) {
  if (item.kind === "image") {
    fitInto(ctx, item.bitmap);
    return;
  }
  const points = item.points;
  drawSegment(item, points[0], points[0]);
  if (points.length > 1) {
    stylePen(item);
    ctx.beginPath();
    ctx.moveTo(points[0][0], points[0][1]);
    for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
    ctx.stroke();
    ctx.globalCompositeOperation = "source-over";
  }
}

function redraw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  state.items.forEach(drawItem);
}

function hasInk() {
  return state.items.some((item) => item.kind === "image" || item.tool === "pen");
}

function setTool(tool) {
  state.tool = tool;
  $("pen").setAttribute("aria-pressed", String(tool === "pen"));
  $("eraser").setAttribute("aria-pressed", String(tool === "eraser"));
  canvas.classList.toggle("erasing", tool === "eraser");
}

canvas.addEventListener("pointerdown", (event) => {
  if (state.pointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  state.pointer = event.pointerId;
  canvas.setPointerCapture(event.pointerId);
  const point = toCanvas(event);
  state.current = { kind: "stroke", tool: state.tool, width: Number($("width").value), points: [point] };
  drawSegment(state.current, point, point);
});

canvas.addEventListener("pointermove", (event) => {
  if (event.pointerId !== state.pointer || !state.current) return;
  event.preventDefault();
  // Coalesced events keep fast pen and finger strokes smooth (the browser batches them per frame).
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const each of events.length ? events : [event]) {
    const points = state.current.points;
    const point = toCanvas(each);
    drawSegment(state.current, points[points.length - 1], point);
    points.push(point);
  }
});

function endStroke(event) {
  if (event.pointerId !== state.pointer) return;
  state.pointer = null;
  if (!state.current) return;
  state.items.push(state.current);
  state.current = null;
  redraw(); // as one path: the canvas is then exactly what undo would rebuild
  changed();
}
for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) canvas.addEventListener(type, endStroke);

function changed() {
  if (!$("live").checked) return;
  clearTimeout(state.timer);
  state.timer = setTimeout(() => { if (hasInk()) search(); }, LIVE_DELAY_MS);
}

function undo() {
  state.items.pop();
  redraw();
  changed();
}

$("pen").addEventListener("click", () => setTool("pen"));
$("eraser").addEventListener("click", () => setTool("eraser"));
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", () => { state.items = []; redraw(); });
$("width").addEventListener("input", () => { $("width-value").textContent = $("width").value; });
document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement && event.target.type !== "checkbox" && event.target.type !== "range") return;
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") { event.preventDefault(); undo(); }
  else if (!event.ctrlKey && !event.metaKey && event.key === "p") setTool("pen");
  else if (!event.ctrlKey && !event.metaKey && event.key === "e") setTool("eraser");
});

async function readBitmap(input) {
  const file = input.files && input.files[0];
  input.value = ""; // picking the same file again fires again
  if (!file) return null;
  try {
    return await createImageBitmap(file);
  } catch {
    setStatus(`${file.name}: not an image the browser can read`, true);
    return null;
  }
}

// The template is only a guide to trace over: it lives on its own canvas and is never sent.
$("template-file").addEventListener("change", async (event) => {
  const bitmap = await readBitmap(event.target);
  if (!bitmap) return;
  const context = template.getContext("2d");
  context.clearRect(0, 0, template.width, template.height);
  fitInto(context, bitmap);
});
$("template-opacity").addEventListener("input", () => { template.style.opacity = $("template-opacity").value / 100; });
$("template-clear").addEventListener("click", () => template.getContext("2d").clearRect(0, 0, template.width, template.height));
template.style.opacity = $("template-opacity").value / 100;

// An uploaded sketch replaces the drawing; it can still be erased and drawn over before searching.
$("sketch-file").addEventListener("change", async (event) => {
  const bitmap = await readBitmap(event.target);
  if (!bitmap) return;
  state.items = [{ kind: "image", bitmap }];
  redraw();
  if ($("live").checked) search();
});

// -- search -----------------------------------------------------------------------------------

function sketchBlob() {
  // The strokes on white paper: the drawing layer alone, so the template stays out of the query.
  const paper = document.createElement("canvas");
  paper.width = canvas.width;
  paper.height = canvas.height;
  const context = paper.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, paper.width, paper.height);
  context.drawImage(canvas, 0, 0);
  return new Promise((resolve) => paper.toBlob(resolve, "image/png"));
}

async function search() {
  if (!hasInk()) {
    setStatus("Draw a sketch first (or upload one).", true);
    return;
  }
  clearTimeout(state.timer);
  const form = new FormData();
  form.append("sketch", await sketchBlob(), "sketch.png");
  form.append("k", $("k").value || "12");
  form.append("lambda", $("lambda").value);
  form.append("rerank", $("rerank").checked ? "true" : "false");
  if (state.controller) state.controller.abort();
  const controller = (state.controller = new AbortController());
  const seq = ++state.seq;
  setStatus("Searching…");
  document.body.classList.add("busy");
  try {
    const response = await fetch("/api/search", { method: "POST", body: form, signal: controller.signal });
    const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
    if (seq !== state.seq) return;
    if (!response.ok) {
      setStatus(body.error || `the server answered ${response.status}`, true);
      return;
    }
    showQuery(body.query);
    $("no-match").hidden = body.no_close_match !== true;  // null: the bundle has no calibration
    showResults(body.results);
    setStatus(`${body.results.length} results in ${Math.round(body.timings_ms.total)} ms`);
  } catch (error) {
    if (error.name !== "AbortError" && seq === state.seq) setStatus(`search failed: ${error.message}`, true);
  } finally {
    if (seq === state.seq) document.body.classList.remove("busy");
  }
}

function showPicture(id, src) {
  const img = $(id);
  img.hidden = !src;
  if (src) img.src = src;
}

function showQuery(query) {
  showPicture("query-sketch", query.sketch);
  showPicture("query-image", query.generated);
  showPicture("query-masks", query.masks);
}

function format(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function fileName(path) {
  return path.split(/[\\/]/).pop();
}

function showResults(results) {
  state.results = results;
  const list = $("results");
  list.replaceChildren();
  for (const hit of results) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "result";
    button.dataset.id = hit.id;
    button.dataset.rank = hit.rank;
    const dice = hit.dice === null ? "" : `, DICE ${format(hit.dice, 0)}`;
    button.setAttribute("aria-label", `Result ${hit.rank}: ${fileName(hit.path)}, score ${format(hit.score, 3)}${dice}`);
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = "";
    img.loading = "lazy";
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.innerHTML = `<b>#${hit.rank}</b> <span>${format(hit.score, 3)}</span>`
      + (hit.dice === null ? "" : ` <span title="DICE of the predicted masks, %">D ${format(hit.dice, 0)}</span>`);
    button.append(img, caption);
    button.addEventListener("click", () => select(hit, button));
    item.append(button);
    list.append(item);
  }
  if (results.length) select(results[0], list.querySelector("button"));
}

function select(hit, button) {
  for (const other of document.querySelectorAll(".result[aria-current]")) other.removeAttribute("aria-current");
  button.setAttribute("aria-current", "true");
  showPicture("detail-image", hit.image);
  showPicture("detail-masks", hit.masks);
  $("detail-image").alt = `Result ${hit.rank}: ${fileName(hit.path)}`;
  const frame = hit.frame ? ` [frame ${hit.frame}]` : "";
  $("detail-caption").textContent = `#${hit.rank}  ${hit.path}${frame} — score ${format(hit.score, 3)}, `
    + `similarity ${format(hit.similarity, 3)}, DICE ${format(hit.dice, 1)}`
    + (hit.quality === null || hit.quality === undefined ? "" : `, match quality ${format(hit.quality, 2)}`);
}

$("search").addEventListener("click", search);
$("lambda").addEventListener("input", () => { $("lambda-value").textContent = Number($("lambda").value).toFixed(2); });
$("show-masks").addEventListener("change", () => document.body.classList.toggle("hide-masks", !$("show-masks").checked));

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    const body = await response.json();
    if (!response.ok) {
      $("info").textContent = response.status === 401 ? "Access token needed: open this page as /?token=YOUR_TOKEN" : body.error;
      return;
    }
    $("info").textContent = `${body.images} images · bundle ${body.bundle_id.split(":")[0]} · ${body.resolution} px · ${body.device}`;
    $("k").max = body.limits.k;
    $("lambda").value = body.defaults.lambda;
    $("lambda-value").textContent = Number(body.defaults.lambda).toFixed(2);
  } catch (error) {
    $("info").textContent = `server unreachable: ${error.message}`;
  }
}
loadInfo();
