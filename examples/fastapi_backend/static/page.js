// The page: pick a photo, paint a mask, submit, follow the job (server-sent events), cancel, compare, download.
// Plain JavaScript, no build step. Every limit and default comes from the service (GET /request-schema).
"use strict";

const $ = (id) => document.getElementById(id);
// the fields shown up front, in this order; every other request field goes to the advanced panel
const MAIN = ["prompt", "negative_prompt", "seed", "strength", "num_inference_steps", "preview_every"];
const FROM_PAINTER = ["image", "mask_image"];
const LABELS = {
  prompt: "Prompt", negative_prompt: "Negative prompt (what to avoid)", seed: "Seed",
  strength: "Strength", num_inference_steps: "Steps", preview_every: "Live preview every … steps",
};
const STAGES = {
  fetching: "Fetching your photo", preprocessing: "Preparing", encoding: "Reading the prompt",
  denoising: "Painting", decoding: "Decoding", postprocessing: "Finishing", uploading: "Saving",
};
const MASK_MAX_SIDE = 2048; // the worker stretches the mask to the photo's size, so this only bounds memory

const fields = new Map(); // request field (dotted for nested ones) -> {input, kind, integer}
let schema = null;
const photo = { file: null, url: null, reference: null };
const strokes = []; // the mask as a list of strokes, redrawn on undo
const jobs = new Map(); // job id -> {request, before (object URL of the photo), prompt}
let current = null; // {id, source (EventSource), cancelling}

class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    Object.assign(this, { status, code: error.code, field: error.field });
  }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(0, { code: "offline", message: "The backend cannot be reached: is it running?" });
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new ApiError(response.status, body.error || { code: `http_${response.status}`, message: response.statusText });
  }
  return body;
}

// --- messages -----------------------------------------------------------------------------------------------

function banner(text, retry) {
  $("banner").hidden = !text;
  $("banner-text").textContent = text || "";
  $("banner-retry").hidden = !retry;
  $("banner-retry").onclick = retry || null;
}

function showApiError(error, fallbackField = "request") {
  if (error.code === "offline" || error.code === "unavailable") {
    const what = error.code === "offline" ? error.message
      : `The job queue is unavailable right now (${error.message}). Your photo and settings are kept: try again.`;
    banner(what);
    return;
  }
  fieldError(error.field || fallbackField, `${error.message} (${error.code})`);
}

function fieldError(field, message) {
  const name = fields.has(field) || FROM_PAINTER.includes(field) ? field
    : [...fields.keys()].find((known) => field.startsWith(`${known}.`)) || "request";
  const target = $(`err-${name}`) || $("err-request");
  target.textContent = message;
  const entry = fields.get(name);
  if (entry) {
    entry.input.setAttribute("aria-invalid", "true");
    if (entry.input.closest("#advanced")) $("advanced").open = true;
    entry.input.focus();
  }
}

function clearErrors() {
  document.querySelectorAll(".error").forEach((element) => { element.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((element) => element.removeAttribute("aria-invalid"));
  banner("");
}

// --- the form, built from the service's schema -----------------------------------------------------------------

function resolve(node) {
  return node && node.$ref ? schema.$defs[node.$ref.split("/").pop()] : node;
}

function describe(property) {
  const branches = (property.anyOf || [property]).map(resolve);
  const nullable = branches.some((branch) => branch.type === "null");
  const main = branches.find((branch) => branch.type !== "null") || {};
  let kind = "json";
  if (main.enum) kind = "enum";
  else if (main.type === "integer" || main.type === "number") kind = "number";
  else if (main.type === "string") kind = "text";
  else if (main.type === "boolean") kind = "bool";
  else if (main.type === "object" && main.properties) kind = "group";
  return { main, nullable, kind, lists: branches.some((branch) => branch.type === "array") && kind !== "json" };
}

function limitsText(name, property, info) {
  const { main } = info;
  const parts = [];
  if (main.minimum !== undefined && main.maximum !== undefined) parts.push(`${main.minimum} to ${main.maximum}`);
  else if (main.minimum !== undefined) parts.push(`at least ${main.minimum}`);
  if (main.exclusiveMinimum !== undefined) parts.push(`above ${main.exclusiveMinimum}`);
  if (main.maximum !== undefined && main.minimum === undefined) parts.push(`at most ${main.maximum}`);
  if (main.enum) parts.push(`one of ${main.enum.join(", ")}`);
  if (property.default !== undefined && property.default !== null && typeof property.default !== "object") {
    parts.push(`default ${property.default}`);
  } else if (info.nullable) {
    parts.push("empty: the service decides");
  }
  if (info.lists && info.kind === "text") parts.push("a JSON list for several");
  if (info.kind === "json") parts.push("JSON");
  return parts.join("; ");
}

function humanize(name) {
  // the request's own field name, readable: "deadline_s" is "Deadline (seconds)"; the name itself is in the help
  const words = name.split(".").pop().replace(/_s$/, " (seconds)").replaceAll("_", " ");
  return words[0].toUpperCase() + words.slice(1);
}

function buildField(name, property, container, label) {
  const info = describe(property);
  if (info.kind === "group") {
    const fieldset = document.createElement("fieldset");
    fieldset.innerHTML = `<legend></legend>`;
    fieldset.querySelector("legend").textContent = info.main.title || name;
    for (const [sub, subProperty] of Object.entries(info.main.properties)) {
      buildField(`${name}.${sub}`, subProperty, fieldset);
    }
    container.append(fieldset);
    return;
  }
  const id = `f-${name}`;
  const wrap = document.createElement("div");
  wrap.className = "field";
  const labelElement = document.createElement("label");
  labelElement.htmlFor = id;
  labelElement.textContent = label || humanize(name);
  let input;
  if (info.kind === "enum") {
    input = document.createElement("select");
    for (const option of [...(info.nullable ? [""] : []), ...info.main.enum]) {
      input.add(new Option(option === "" ? "(the service decides)" : option, option));
    }
  } else if (name === "prompt" || name === "negative_prompt" || info.kind === "json") {
    input = document.createElement("textarea");
    input.rows = info.kind === "json" ? 2 : 3;
  } else {
    input = document.createElement("input");
    input.type = info.kind === "number" ? "number" : info.kind === "bool" ? "checkbox" : "text";
  }
  input.id = id;
  input.name = name;
  if (info.kind === "number") {
    input.inputMode = info.main.type === "integer" ? "numeric" : "decimal";
    input.step = info.main.type === "integer" ? "1" : "any";
    if (info.main.minimum !== undefined) input.min = info.main.minimum;
    if (info.main.maximum !== undefined) input.max = info.main.maximum;
  }
  if (info.kind === "text" && info.main.pattern) input.pattern = info.main.pattern;
  const initial = property.default;
  if (initial !== undefined && initial !== null && typeof initial !== "object") {
    if (info.kind === "bool") input.checked = initial;
    else input.value = String(initial);
  }
  // a default the user did not touch is left to the service: a mode that brings its own (fast mode's steps) wins
  for (const event of ["input", "change"]) input.addEventListener(event, () => { input.dataset.edited = "yes"; });
  const help = document.createElement("p");
  help.className = "help";
  help.id = `help-${name}`;
  const about = [property.description || info.main.description, limitsText(name, property, info)]
    .filter(Boolean).map((text) => text.replace(/\.$/, "")).join(". ");
  const code = document.createElement("code");
  code.textContent = name; // the request's field, as the API and its errors name it
  help.append(about ? `${about}. ` : "", code);
  const error = document.createElement("p");
  error.className = "error";
  error.id = `err-${name}`;
  input.setAttribute("aria-describedby", `${help.id} ${error.id}`);
  wrap.append(labelElement, input);
  if (name === "seed") {
    const dice = document.createElement("button");
    dice.type = "button";
    dice.className = "dice";
    dice.textContent = "⚄ Random";
    dice.setAttribute("aria-label", "Pick a random seed");
    dice.onclick = () => { input.value = String(Math.floor(Math.random() * 2 ** 31)); };
    wrap.append(dice);
  }
  wrap.append(help, error);
  container.append(wrap);
  fields.set(name, { input, kind: info.kind, integer: info.main.type === "integer", property });
}

async function loadSchema() {
  try {
    schema = await api("/request-schema");
  } catch (error) {
    $("schema-loading").textContent = "The service's options could not be loaded.";
    banner(error.message, () => { banner(""); loadSchema(); });
    return;
  }
  $("schema-loading").remove();
  fields.clear();
  $("main-fields").replaceChildren();
  $("advanced-fields").replaceChildren();
  for (const name of MAIN) {
    if (schema.properties[name]) buildField(name, schema.properties[name], $("main-fields"), LABELS[name]);
  }
  for (const [name, property] of Object.entries(schema.properties)) {
    if (!MAIN.includes(name) && !FROM_PAINTER.includes(name)) buildField(name, property, $("advanced-fields"));
  }
  const steps = fields.get("num_inference_steps");
  const every = fields.get("preview_every");
  const mode = fields.get("mode");
  // previews are what makes waiting bearable: about ten a job unless the user says otherwise
  const suggest = () => {
    if (steps && every && !every.input.dataset.edited) {
      every.input.value = String(Math.max(1, Math.round(Number(steps.input.value || 1) / 10)));
    }
  };
  if (every && !every.input.value) {
    suggest();
    steps?.input.addEventListener("input", suggest);
  }
  // fast mode runs its own few steps unless the user set a number: the field says so instead of showing 50
  if (steps && mode) {
    mode.input.addEventListener("change", () => {
      if (steps.input.dataset.edited) return;
      const fast = mode.input.value === "fast";
      steps.input.value = fast ? "" : String(steps.property.default);
      steps.input.placeholder = fast ? "fast mode's own" : "";
      suggest();
    });
  }
  const limits = schema["x-limits"] || {};
  if (limits.upload_max_bytes) {
    $("upload-limits").textContent = `${limits.upload_types.map((type) => type.split("/")[1].toUpperCase())
      .join(", ")}, up to ${Math.floor(limits.upload_max_bytes / 1e6)} MB.`;
  }
}

function readFields() {
  const request = {};
  let bad = false;
  for (const [name, { input, kind, integer, property }] of fields) {
    let value;
    const raw = input.value.trim();
    if (kind === "bool") {
      value = input.checked;
    } else if (kind === "number" && input.validity.badInput) {
      fieldError(name, "Enter a number.");
      bad = true;
      continue;
    } else if (raw === "") {
      continue;
    } else if (kind === "number") {
      value = Number(raw);
      if (integer && !Number.isInteger(value)) value = raw; // sent as typed: the service says what is wrong
    } else if (kind === "json" || (raw.startsWith("[") && (name === "prompt" || name === "negative_prompt"))) {
      try {
        value = JSON.parse(raw);
      } catch (error) {
        fieldError(name, `This is not valid JSON: ${error.message}`);
        bad = true;
        continue;
      }
    } else {
      value = raw;
    }
    if (!input.dataset.edited && value === property.default) continue; // the service applies its own default
    const path = name.split(".");
    let target = request;
    for (const part of path.slice(0, -1)) target = target[part] ??= {};
    target[path.at(-1)] = value;
  }
  return bad ? null : request;
}

// --- the photo and the mask ---------------------------------------------------------------------------------------

function choosePhoto(file) {
  clearErrors();
  if (!file) return;
  const types = (schema && schema["x-limits"] && schema["x-limits"].upload_types) || [file.type];
  if (!types.includes(file.type)) {
    fieldError("image", `${file.name} is not a photo the service reads (${types.join(", ")}).`);
    return;
  }
  if (photo.url) URL.revokeObjectURL(photo.url);
  Object.assign(photo, { file, url: URL.createObjectURL(file), reference: null });
  const view = $("photo-view");
  view.onload = () => {
    // naturalWidth is the photo as shown: EXIF orientation applied, as the worker applies it
    const scale = Math.min(1, MASK_MAX_SIDE / Math.max(view.naturalWidth, view.naturalHeight));
    $("mask").width = Math.round(view.naturalWidth * scale);
    $("mask").height = Math.round(view.naturalHeight * scale);
    strokes.length = 0;
    redraw();
    $("painter").hidden = false;
  };
  view.src = photo.url;
}

function tool() {
  return document.querySelector('input[name="tool"]:checked').value;
}

function maskScale() {
  const canvas = $("mask");
  return canvas.width / canvas.getBoundingClientRect().width;
}

function drawStroke(context, stroke) {
  const canvas = context.canvas;
  context.globalCompositeOperation = stroke.tool === "erase" ? "destination-out" : "source-over";
  if (stroke.tool === "clear") { context.clearRect(0, 0, canvas.width, canvas.height); return; }
  if (stroke.tool === "fill") { context.fillStyle = "rgb(255, 0, 110)"; context.fillRect(0, 0, canvas.width, canvas.height); return; }
  context.strokeStyle = context.fillStyle = "rgb(255, 0, 110)";
  context.lineWidth = stroke.size;
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  const [first, ...rest] = stroke.points;
  if (!rest.length) { context.arc(first[0], first[1], stroke.size / 2, 0, 2 * Math.PI); context.fill(); return; }
  context.moveTo(...first);
  for (const point of rest) context.lineTo(...point);
  context.stroke();
}

function redraw() {
  const context = $("mask").getContext("2d");
  context.clearRect(0, 0, context.canvas.width, context.canvas.height);
  for (const stroke of strokes) drawStroke(context, stroke);
}

function pointerAt(event) {
  const rect = $("mask").getBoundingClientRect();
  const scale = maskScale();
  return [(event.clientX - rect.left) * scale, (event.clientY - rect.top) * scale];
}

function setUpPainter() {
  const canvas = $("mask");
  let active = null;
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    active = { tool: tool(), size: Number($("brush-size").value) * maskScale(), points: [pointerAt(event)] };
    strokes.push(active);
    drawStroke(canvas.getContext("2d"), active);
  });
  canvas.addEventListener("pointermove", (event) => {
    moveRing(event);
    if (!active) return;
    active.points.push(pointerAt(event));
    drawStroke(canvas.getContext("2d"), { ...active, points: active.points.slice(-2) });
  });
  const end = () => { active = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("pointerleave", () => { $("brush-ring").style.display = "none"; });
  $("brush-size").addEventListener("input", () => { $("brush-size-out").value = `${$("brush-size").value} px`; });
  $("undo").onclick = () => { strokes.pop(); redraw(); };
  $("clear").onclick = () => { strokes.push({ tool: "clear" }); redraw(); };
  $("fill").onclick = () => { strokes.push({ tool: "fill" }); redraw(); };
  $("painter").addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "z") { event.preventDefault(); $("undo").click(); }
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choosePhoto(event.dataTransfer.files[0]);
  });
  $("photo").addEventListener("change", () => choosePhoto($("photo").files[0]));
}

function moveRing(event) {
  const ring = $("brush-ring");
  const rect = $("stage").getBoundingClientRect();
  const size = Number($("brush-size").value);
  Object.assign(ring.style, { display: "block", width: `${size}px`, height: `${size}px`,
    left: `${event.clientX - rect.left - size / 2}px`, top: `${event.clientY - rect.top - size / 2}px` });
}

function maskIsEmpty() {
  const canvas = $("mask");
  const alpha = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let index = 3; index < alpha.length; index += 4) if (alpha[index] >= 128) return false;
  return true;
}

function maskPng() {
  // white where painted, black elsewhere: what the service reads as "repaint here"
  const source = $("mask");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const context = out.getContext("2d");
  context.drawImage(source, 0, 0);
  context.globalCompositeOperation = "source-in";
  context.fillStyle = "#fff";
  context.fillRect(0, 0, out.width, out.height);
  context.globalCompositeOperation = "destination-over";
  context.fillStyle = "#000";
  context.fillRect(0, 0, out.width, out.height);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function upload(blob, field) {
  // the backend presigns; the file goes from the browser straight to S3, never through the backend
  const grant = await api("/uploads", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ content_type: blob.type, size: blob.size }) })
    .catch((error) => { throw Object.assign(error, { field }); });
  const form = new FormData();
  for (const [key, value] of Object.entries(grant.fields)) form.append(key, value);
  form.append("file", blob);
  let response;
  try {
    response = await fetch(grant.url, { method: "POST", body: form });
  } catch (error) {
    throw new ApiError(0, { code: "upload_failed", field, message: "The storage could not be reached for the upload." });
  }
  if (!response.ok) {
    const text = await response.text();
    const reason = (text.match(/<Message>([^<]*)<\/Message>/) || [])[1] || response.statusText;
    throw new ApiError(response.status, { code: "upload_refused", field, message: `The storage refused the file: ${reason}` });
  }
  return grant.reference;
}

// --- submit and follow ----------------------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  clearErrors();
  if (!schema) { banner("The service's options are not loaded yet.", () => loadSchema()); return; }
  if (!photo.file) { fieldError("image", "Choose a photo first."); $("photo").focus(); return; }
  if (maskIsEmpty()) { fieldError("mask_image", "Paint over the part of the photo to repaint."); $("mask").focus(); return; }
  const fieldsRequest = readFields();
  if (!fieldsRequest) return;
  const button = $("submit");
  button.disabled = true;
  button.textContent = "Uploading…";
  try {
    photo.reference ||= await upload(photo.file, "image");
    const mask = await upload(await maskPng(), "mask_image");
    const request = { ...fieldsRequest, image: photo.reference, mask_image: mask };
    button.textContent = "Submitting…";
    const { job_id: id } = await api("/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request) });
    jobs.set(id, { request, before: photo.url });
    remember(id, request);
    follow(id);
  } catch (error) {
    if (error instanceof ApiError) showApiError(error);
    else throw error;
  } finally {
    button.disabled = false;
    button.textContent = "Paint it";
  }
}

function follow(id) {
  if (current && current.source) current.source.close();
  current = { id, source: null, cancelling: false };
  $("job").hidden = false;
  $("result").hidden = true;
  $("job-error").hidden = true;
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  $("previews").hidden = true;
  $("preview-strip").replaceChildren();
  $("job-progress").value = 0;
  $("job-facts").replaceChildren();
  setState("Queued: waiting for a worker…");
  listen(id);
  $("job").scrollIntoView({ block: "nearest" });
}

function listen(id) {
  const source = new EventSource(`/jobs/${encodeURIComponent(id)}/events`);
  current.source = source;
  source.addEventListener("state", (event) => { banner(""); showQueued(JSON.parse(event.data)); });
  source.addEventListener("progress", (event) => { banner(""); showProgress(JSON.parse(event.data)); });
  source.addEventListener("done", (event) => { source.close(); finished(JSON.parse(event.data)); });
  source.addEventListener("timeout", () => { source.close(); if (current && current.id === id) listen(id); });
  source.addEventListener("error", (event) => {
    if (event.data) { // the backend's own event: Redis was lost; the job may go on
      source.close();
      const error = JSON.parse(event.data);
      banner(`The job queue is unavailable right now (${error.message}).`, () => { banner(""); listen(id); });
    } else if (source.readyState === EventSource.CONNECTING) {
      banner("Lost the connection to the backend; reconnecting…");
    } else {
      banner("The backend cannot be reached: is it running?", () => { banner(""); listen(id); });
    }
  });
}

function setState(text) {
  $("job-state").textContent = text;
}

function facts(list, pairs) {
  list.replaceChildren();
  for (const [term, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    list.append(dt, dd);
  }
}

function showQueued(status) {
  if (current.cancelling) return;
  // the job's place (status.queue: position 1 is next, waiting in all, starts_in_s at the queue's recent pace)
  const place = status.queue || {};
  const starts = place.starts_in_s != null ? `, starts in about ${Math.round(place.starts_in_s)} s` : "";
  if (status.state === "STARTED") setState("Starting: a worker took the job…");
  else setState(place.position !== undefined
    ? `Queued: ${place.position} of ${place.waiting} waiting${starts}` : "Queued: waiting for a worker…");
  facts($("job-facts"), [["Queue position", place.position], ["Starts in (s)", place.starts_in_s ?? undefined]]);
}

function duration(seconds) {
  if (seconds === undefined || seconds === null) return undefined;
  if (seconds < 60) return `about ${Math.max(1, Math.round(seconds))} s`;
  return `about ${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function showProgress(progress) {
  current.running = true;
  if (current.cancelling) return;
  const stage = STAGES[progress.stage] || progress.stage;
  const steps = progress.total_steps ? `step ${progress.step} of ${progress.total_steps}` : "";
  setState(`${stage}${steps ? `: ${steps}` : ""}`);
  $("job-progress").value = progress.percent || 0;
  facts($("job-facts"), [
    ["Stage", stage], ["Step", progress.total_steps ? `${progress.step} of ${progress.total_steps}` : undefined],
    ["Image", progress.images > 1 ? `${progress.image + 1} of ${progress.images}` : undefined],
    ["Done", `${Math.round(progress.percent || 0)} %`], ["Time left", duration(progress.eta_s)],
  ]);
  if (progress.preview && progress.preview.startsWith("http") && $("preview").src !== progress.preview) {
    $("previews").hidden = false;
    $("preview").src = progress.preview;
    const item = document.createElement("li");
    const thumb = new Image();
    thumb.src = progress.preview;
    thumb.alt = `Preview at step ${progress.step}`;
    item.append(thumb);
    $("preview-strip").append(item);
  }
}

async function cancel() {
  if (!current) return;
  $("cancel").disabled = true;
  current.cancelling = true;
  const queued = !current.running;
  setState("Cancelling…");
  try {
    await api(`/jobs/${encodeURIComponent(current.id)}`, { method: "DELETE" });
    // a queued job ends only when a worker reaches it, and then does not start
    if (queued && current.cancelling) setState("Cancelled: the job will not start.");
  } catch (error) {
    if (error.code !== "already_ended") {
      current.cancelling = false;
      $("cancel").disabled = false;
      showApiError(error);
    }
  }
}

function finished(status) {
  const id = status.job_id;
  remember(id, null, status.state);
  if (!current || current.id !== id) return;
  $("cancel").hidden = true;
  facts($("job-facts"), []);
  if (status.state === "SUCCESS") {
    setState("Done.");
    $("job-progress").value = 100;
    showResult(status);
    return;
  }
  const error = status.error || { code: "unknown", message: "the job ended without a result" };
  if (error.code === "cancelled") {
    setState("Cancelled.");
    return;
  }
  setState("The job failed.");
  const box = $("job-error");
  box.hidden = false;
  box.textContent = `${error.message} (${error.code}${error.field ? `, field ${error.field}` : ""})`;
  if (error.field && error.field !== "job_id") fieldError(error.field, `${error.message} (${error.code})`);
}

function showResult(status) {
  const result = status.result;
  const job = jobs.get(status.job_id) || {};
  $("result").hidden = false;
  const picker = $("result-picker");
  picker.replaceChildren();
  picker.hidden = result.images.length < 2;
  const pick = (image) => {
    $("after").src = image.url;
    $("download").onclick = () => download(status.job_id, image);
  };
  result.images.forEach((image, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `Image ${index + 1} (seed ${image.seed})`;
    button.onclick = () => pick(image);
    picker.append(button);
  });
  pick(result.images[0]);
  $("before").hidden = $("compare-line").hidden = !job.before;
  $("compare-slider").disabled = !job.before;
  if (job.before) $("before").src = job.before;
  const parameters = result.parameters;
  const request = job.request || {};
  facts($("parameters"), [
    ["Prompt", request.prompt], ["Negative prompt", request.negative_prompt],
    ["Seeds", parameters.seeds.join(", ")], ["Strength", parameters.strength],
    ["Steps", `${parameters.steps_run} run of ${parameters.num_inference_steps}`],
    ["Size", `${parameters.width} × ${parameters.height}`],
    ["True CFG", parameters.true_cfg ? `on, scale ${parameters.true_cfg_scale}` : "off"],
    ["Mode", parameters.mode],
    ["Adapters", (parameters.adapters || []).map((adapter) => `${adapter.name} × ${adapter.scale}`).join(", ")],
    ["Padding mask crop", parameters.padding_mask_crop], ["Mask grid", parameters.mask_grid],
    ["Output", parameters.output_type], ["Plugins", parameters.plugins.join(", ")],
    ["Took", result.timings.total !== undefined ? `${result.timings.total.toFixed(1)} s` : undefined],
    ["Job", status.job_id],
  ]);
  $("result").scrollIntoView({ block: "nearest" });
}

async function download(id, image) {
  // a cross-origin link cannot name its download, so the file is fetched (the bucket allows this origin) and saved
  const extension = (image.content_type.split("/")[1] || "bin").replace("jpeg", "jpg");
  const name = `inpaint-${id}-${image.index}.${extension}`;
  $("download-status").textContent = "Downloading…";
  try {
    const response = await fetch(image.url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const url = URL.createObjectURL(await response.blob());
    const link = Object.assign(document.createElement("a"), { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    $("download-status").textContent = `Saved as ${name}.`;
  } catch (error) {
    $("download-status").textContent = "The storage did not allow the download here; opening the image instead.";
    window.open(image.url, "_blank", "noopener");
  }
}

// --- the session's history ---------------------------------------------------------------------------------------

function history() {
  try { return JSON.parse(sessionStorage.getItem("inpaint-jobs") || "[]"); } catch { return []; }
}

function remember(id, request, state) {
  const list = history();
  let entry = list.find((item) => item.id === id);
  if (!entry) {
    entry = { id, prompt: (request && request.prompt) || "(no prompt)", at: new Date().toLocaleTimeString() };
    list.unshift(entry);
  }
  if (state) entry.state = state;
  sessionStorage.setItem("inpaint-jobs", JSON.stringify(list.slice(0, 20)));
  renderHistory();
}

function renderHistory() {
  const list = history();
  $("history").hidden = !list.length;
  $("history-list").replaceChildren(...list.map((entry) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link";
    const state = { SUCCESS: "done", FAILURE: "failed or cancelled", REVOKED: "cancelled" }[entry.state] || "running";
    button.textContent = `${entry.at}: “${entry.prompt}” (${state})`;
    button.onclick = () => reopen(entry.id);
    item.append(button);
    return item;
  }));
}

async function reopen(id) {
  try {
    const status = await api(`/jobs/${encodeURIComponent(id)}`);
    follow(id);
    if (status.state === "SUCCESS" || status.state === "FAILURE" || status.state === "REVOKED") {
      current.source.close();
      finished(status);
    }
  } catch (error) {
    showApiError(error);
  }
}

// --- start -----------------------------------------------------------------------------------------------------------

function setUpCompare() {
  const slider = $("compare-slider");
  const apply = () => {
    $("before").style.clipPath = `inset(0 ${100 - Number(slider.value)}% 0 0)`;
    $("compare-line").style.left = `${slider.value}%`;
  };
  slider.addEventListener("input", apply);
  apply();
}

document.addEventListener("DOMContentLoaded", () => {
  setUpPainter();
  setUpCompare();
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  renderHistory();
  loadSchema();
});
