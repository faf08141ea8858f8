// sketch2medi draw-to-search page: a canvas the clinician draws on, sent as a PNG to /api/search.
// No libraries and nothing from other hosts: it runs offline against the local server.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const template = $("template");
const LIVE_DELAY_MS = 600; // after the last stroke: a pause, not every pointer lift mid-drawing

const UNLABELLED = { index: 0, name: "unlabelled", colour: "#000000" };

const state = {
  tool: "pen",
  penClass: UNLABELLED, // the class the next strokes carry (drawn in its colour; /api/info's classes)
  items: [],        // what is drawn, in order: {kind: "stroke", tool, width, colour, classIndex, points} or {kind: "image", bitmap}
  current: null,    // the stroke under the pointer
  pointer: null,    // the one pointer drawing it (a second finger is ignored)
  seq: 0,           // only the newest search's answer is shown
  controller: null,
  timer: null,
  cards: [],        // what the result grid shows: {hit, meta, group}
  liked: [],        // archive image ids marked relevant / not relevant, sent with the next sketch searches
  disliked: [],
  last: null,       // the last query, re-run by the filter bar: {sketch: true} or {like: [ids]}
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
  ctx.strokeStyle = ctx.fillStyle = item.colour || "#000";
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
  state.current = { kind: "stroke", tool: state.tool, width: Number($("width").value), colour: state.penClass.colour,
                    classIndex: state.penClass.index, points: [point] };
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
  else if (!event.ctrlKey && !event.metaKey && !event.altKey && /^[0-9]$/.test(event.key)) choosePenClass(Number(event.key));
});

// -- class palette: strokes carry a class, drawn in the colour the server's table gives it ----------

function choosePenClass(index) {
  const button = document.querySelector(`#palette [data-index="${index}"]`);
  if (!button) return;
  for (const other of document.querySelectorAll("#palette [role=radio]")) {
    const chosen = other === button;
    other.setAttribute("aria-checked", String(chosen));
    other.tabIndex = chosen ? 0 : -1; // one tab stop for the group; arrows move within it
  }
  state.penClass = JSON.parse(button.dataset.entry);
  setTool("pen");
}

function buildPalette(classes) {
  const palette = $("palette");
  palette.replaceChildren();
  for (const entry of [UNLABELLED, ...classes.filter((c) => c.index !== 0)]) {
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("role", "radio");
    button.dataset.index = entry.index;
    button.dataset.entry = JSON.stringify(entry);
    button.title = `${entry.name} (${entry.index})`;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = entry.colour;
    const name = document.createElement("span");
    name.textContent = entry.name; // class names come from the bundle: text, never markup
    button.append(swatch, name);
    button.addEventListener("click", () => choosePenClass(entry.index));
    palette.append(button);
  }
  palette.addEventListener("keydown", (event) => {
    const buttons = [...palette.querySelectorAll("[role=radio]")];
    const at = buttons.indexOf(document.activeElement);
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (at < 0 || !step) return;
    event.preventDefault();
    const next = buttons[(at + step + buttons.length) % buttons.length];
    choosePenClass(Number(next.dataset.index));
    next.focus();
  });
  choosePenClass(state.penClass.index);
}

function isLabelled() {
  return state.items.some((item) => item.kind === "stroke" && item.tool === "pen" && item.classIndex > 0);
}

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
  if (bitmap) showTemplate(bitmap);
});
$("template-opacity").addEventListener("input", () => { template.style.opacity = $("template-opacity").value / 100; });
$("template-clear").addEventListener("click", () => template.getContext("2d").clearRect(0, 0, template.width, template.height));

function showTemplate(bitmap) {
  const context = template.getContext("2d");
  context.clearRect(0, 0, template.width, template.height);
  fitInto(context, bitmap);
}

// An archive image as the template, by its id (as on each result), fetched as any result picture.
async function showTemplateById(id) {
  if (!/^\d+$/.test(id)) {
    setStatus("Template: enter the id of an archive image (shown on each result)", true);
    return;
  }
  const response = await fetch(`/api/images/${id}/image.png`);
  if (!response.ok) {
    const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
    setStatus(`Template: ${body.error}`, true);
    return;
  }
  showTemplate(await createImageBitmap(await response.blob()));
  setStatus(`Template: archive image ${id} (shown under the drawing, not searched)`);
}
$("template-show").addEventListener("click", () => showTemplateById($("template-id").value.trim()));
$("template-id").addEventListener("keydown", (event) => {
  if (event.key === "Enter") { event.preventDefault(); showTemplateById($("template-id").value.trim()); }
});
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

async function searchForm(query) {
  // query: {sketch: true} (the drawing, with the feedback given) or {like: [ids]} (more like these).
  const form = new FormData();
  if (query.sketch) {
    form.append("sketch", await sketchBlob(), "sketch.png");
    for (const id of state.liked) form.append("like", String(id));
    for (const id of state.disliked) form.append("unlike", String(id));
  } else {
    for (const id of query.like) form.append("like", String(id));
  }
  const where = $("where").value.trim();
  if (where) form.append("where", where);
  if ($("group").value) form.append("group", $("group").value);
  form.append("k", $("k").value || "12");
  form.append("lambda", $("lambda").value);
  form.append("rerank", $("rerank").checked ? "true" : "false");
  if (query.sketch && isLabelled()) form.append("labelled", "true");
  return form;
}

async function runSearch(query, what) {
  clearTimeout(state.timer);
  state.last = query;
  const form = await searchForm(query);
  if (state.controller) state.controller.abort();
  const controller = (state.controller = new AbortController());
  const seq = ++state.seq;
  setStatus(`Searching${what}…`);
  document.body.classList.add("busy");
  try {
    const response = await fetch("/api/search", { method: "POST", body: form, signal: controller.signal });
    const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
    if (seq !== state.seq) return;
    showFieldError(response.ok ? null : body.field, body.error);
    if (!response.ok) {
      setStatus(body.error || `the server answered ${response.status}`, true);
      return;
    }
    showAnswer(body, what);
  } catch (error) {
    if (error.name !== "AbortError" && seq === state.seq) setStatus(`search failed: ${error.message}`, true);
  } finally {
    if (seq === state.seq) document.body.classList.remove("busy");
  }
}

function search() {
  if (!hasInk()) {
    setStatus("Draw a sketch first (or upload one).", true);
    return;
  }
  runSearch({ sketch: true }, state.liked.length || state.disliked.length ? " with your feedback" : "");
}

function showAnswer(body, what) {
  showQuery(body.query);
  $("no-match").hidden = body.no_close_match !== true;  // null: the bundle has no calibration
  showCards(body);
  const shown = body.groups ? `${body.groups.length} groups` : `${body.results.length} results`;
  const matching = body.matching === null ? "" : ` (${body.matching} archive images match the filter)`;
  setStatus(`${shown}${what} in ${Math.round(body.timings_ms.total)} ms${matching}`);
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

// -- filter bar and grouping ------------------------------------------------------------------

function showFieldError(field, message) {
  // A rejected filter is explained under the filter bar, in the server's words.
  const error = $("where-error");
  const isWhere = field === "where";
  error.hidden = !isWhere;
  error.textContent = isWhere ? message : "";
  $("where").setAttribute("aria-invalid", String(isWhere));
}

function rerun() {
  if (state.last && !state.last.sketch) runSearch(state.last, "");
  else search();
}

$("filter-bar").addEventListener("submit", (event) => {
  event.preventDefault();
  rerun();
});
$("group").addEventListener("change", () => { if (state.last) rerun(); });

// -- more like this and relevance feedback ----------------------------------------------------

function moreLikeThis(hit) {
  runSearch({ like: [hit.id] }, ` for more like image ${hit.id}`);
}

function judge(id, relevant) {
  // A second click on the same verdict takes it back; the other verdict replaces it.
  const [mine, other] = relevant ? [state.liked, state.disliked] : [state.disliked, state.liked];
  const at = mine.indexOf(id);
  if (at >= 0) mine.splice(at, 1);
  else mine.push(id);
  if (other.includes(id)) other.splice(other.indexOf(id), 1);
  showFeedback();
  searchWithFeedback();
}

function searchWithFeedback() {
  // The drawing with the verdicts; with nothing drawn, more like the relevant ones.
  if (hasInk()) runSearch({ sketch: true }, " with your feedback");
  else if (state.liked.length) runSearch({ like: [...state.liked] }, " for more like the relevant images");
  else setStatus("Draw a sketch, or mark a result as relevant, to search with this feedback.", true);
}

function unjudge(id) {
  for (const list of [state.liked, state.disliked]) if (list.includes(id)) list.splice(list.indexOf(id), 1);
  showFeedback();
  searchWithFeedback();
}

function showChips(listId, noneId, ids, verdict) {
  const list = $(listId);
  list.replaceChildren();
  for (const id of ids) {
    const item = document.createElement("li");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip";
    remove.dataset.id = id;
    remove.textContent = `image ${id} ×`;
    remove.setAttribute("aria-label", `Remove image ${id} from ${verdict}`);
    remove.addEventListener("click", () => unjudge(id));
    item.append(remove);
    list.append(item);
  }
  $(noneId).hidden = ids.length > 0;
}

function showFeedback() {
  $("feedback").hidden = !state.liked.length && !state.disliked.length;
  showChips("liked", "liked-none", state.liked, "relevant");
  showChips("disliked", "disliked-none", state.disliked, "not relevant");
  for (const card of document.querySelectorAll("#results .card")) {
    const id = Number(card.dataset.id);
    card.querySelector(".up").setAttribute("aria-pressed", String(state.liked.includes(id)));
    card.querySelector(".down").setAttribute("aria-pressed", String(state.disliked.includes(id)));
    card.classList.toggle("liked", state.liked.includes(id));
    card.classList.toggle("disliked", state.disliked.includes(id));
  }
}

$("feedback-clear").addEventListener("click", () => {
  state.liked.length = state.disliked.length = 0;
  showFeedback();
  if (hasInk()) search();
});

// -- result cards -----------------------------------------------------------------------------

function thumbIcon() {
  return $("thumb-icon").content.firstElementChild.cloneNode(true);
}

function format(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function fileName(path) {
  return path.split(/[\\/]/).pop();
}

function shownDate(date) {
  return /^\d{8}$/.test(date) ? `${date.slice(0, 4)}-${date.slice(4, 6)}-${date.slice(6)}` : date;
}

function metaParts(meta) {
  // [label, shown value, full value] of what the catalog knows; long UIDs are shortened to their end.
  const parts = [];
  if (meta.patient_id) parts.push(["patient", meta.patient_id, meta.patient_id]);
  if (meta.study_uid) parts.push(["study", meta.study_uid.length > 12 ? `…${meta.study_uid.slice(-10)}` : meta.study_uid, meta.study_uid]);
  if (meta.study_date) parts.push(["date", shownDate(meta.study_date), meta.study_date]);
  if (meta.modality) parts.push(["modality", meta.modality, meta.modality]);
  return parts;
}

function groupCount(group) {
  // The group's size, and how many near-identical frames its best hit stands for.
  const noun = { patient: "patient", study: "study", series: "series" }[group.by];
  if (!noun) return "";
  const size = `${noun} of ${group.frames} frame${group.frames === 1 ? "" : "s"}`;
  const count = group.hits[0].count;
  return count > 1 ? `${size} · ${count} near-identical as one` : size;
}

function cardsOf(body) {
  if (!body.groups) return body.results.map((hit) => ({ hit, meta: hit, group: null }));
  return body.groups.map((group) => ({ hit: { ...group.hits[0], rank: group.rank }, meta: group, group }));
}

function actionButton(className, label, content, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.setAttribute("aria-label", label);
  button.title = label;
  button.append(content);
  button.addEventListener("click", onClick);
  return button;
}

function card({ hit, meta, group }) {
  const item = document.createElement("li");
  item.className = "card";
  item.dataset.id = hit.id;
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
  const rank = document.createElement("b");
  rank.textContent = `#${hit.rank}`;
  const score = document.createElement("span");
  score.textContent = format(hit.score, 3);
  caption.append(rank, score);
  if (hit.dice !== null) {
    const diceText = document.createElement("span");
    diceText.title = "DICE of the predicted masks, %";
    diceText.textContent = `D ${format(hit.dice, 0)}`;
    caption.append(diceText);
  }
  button.append(img, caption);
  button.addEventListener("click", () => select(hit, meta, button));

  const details = document.createElement("p");
  details.className = "meta";
  const idText = document.createElement("span");
  idText.textContent = `id ${hit.id}`;
  details.append(idText);
  for (const [label, shown, full] of metaParts(meta)) {
    const part = document.createElement("span");
    part.className = label;
    part.title = `${label}: ${full}`;
    part.textContent = label === "date" || label === "modality" ? shown : `${label} ${shown}`;
    details.append(part);
  }
  item.append(button, details);
  if (group && groupCount(group)) {
    const count = document.createElement("p");
    count.className = "count";
    count.textContent = groupCount(group);
    item.append(count);
  }

  const actions = document.createElement("div");
  actions.className = "actions";
  actions.setAttribute("role", "group");
  actions.setAttribute("aria-label", `Result ${hit.rank}`);
  const down = thumbIcon();
  down.classList.add("flipped");
  actions.append(
    actionButton("more", `More like image ${hit.id}`, "More like this", () => moreLikeThis(hit)),
    actionButton("up", `Image ${hit.id} is relevant`, thumbIcon(), () => judge(hit.id, true)),
    actionButton("down", `Image ${hit.id} is not relevant`, down, () => judge(hit.id, false)));
  item.append(actions);
  return item;
}

function showCards(body) {
  state.cards = cardsOf(body);
  const list = $("results");
  list.replaceChildren(...state.cards.map(card));
  showFeedback();
  const first = list.querySelector(".result");
  if (first) select(state.cards[0].hit, state.cards[0].meta, first);
}

function select(hit, meta, button) {
  for (const other of document.querySelectorAll(".result[aria-current]")) other.removeAttribute("aria-current");
  button.setAttribute("aria-current", "true");
  showPicture("detail-image", hit.image);
  showPicture("detail-masks", hit.masks);
  $("detail-image").alt = `Result ${hit.rank}: ${fileName(hit.path)}`;
  const frame = hit.frame ? ` [frame ${hit.frame}]` : "";
  const known = metaParts(meta).map(([label, , full]) => `${label} ${label === "date" ? shownDate(full) : full}`);
  if (meta.body_part) known.push(`body part ${meta.body_part}`);
  if (meta.tag) known.push(`tag ${meta.tag}`);
  $("detail-caption").textContent = `#${hit.rank}  ${hit.path}${frame} — score ${format(hit.score, 3)}, `
    + `similarity ${format(hit.similarity, 3)}, DICE ${format(hit.dice, 1)}`
    + (hit.quality === null || hit.quality === undefined ? "" : `, match quality ${format(hit.quality, 3)}`)
    + (known.length ? ` — ${known.join(", ")}` : "");
  const trace = $("detail-template");
  trace.hidden = false;
  trace.dataset.id = hit.id;
}

$("detail-template").addEventListener("click", () => {
  const id = $("detail-template").dataset.id;
  $("template-id").value = id;
  showTemplateById(id);
});

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
    buildPalette(body.classes || []);
    $("lambda").value = body.defaults.lambda;
    $("lambda-value").textContent = Number(body.defaults.lambda).toFixed(2);
  } catch (error) {
    $("info").textContent = `server unreachable: ${error.message}`;
  }
}
loadInfo();
