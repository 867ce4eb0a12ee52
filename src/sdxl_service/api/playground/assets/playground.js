// The playground: the service's own /v1 API, streamed, shown as it comes.
"use strict";

const API = "/v1";
const KEY_STORAGE = "sdxl-playground-api-key";
const FIELDS = [
  "prompt", "negative_prompt", "size", "n", "output_format", "seed",
  "num_inference_steps", "guidance_scale", "refiner", "scheduler", "lora", "lora_scale",
  "partial_images", "model", "strength",
];
// A model's sidecar defaults (named as the request's fields) the form shows when it is picked.
const DEFAULT_FIELDS = ["num_inference_steps", "guidance_scale", "scheduler", "refiner"];
const MAX_IP_ADAPTER_IMAGES = 4;
const MASK_UNDO_STEPS = 20;
// What the server takes as a repainted pixel of the mask: alpha below 128 (docs/API.md).
const MASK_ALPHA_THRESHOLD = 128;
const PREVIEW_DELAY_MS = 250;
// Fields of a request read from an image's infotext that the form has no input for: kept and
// sent with the form's (generations only), shown beside the reader, until other settings come.
const EXTRA_FIELDS = ["schedule_type", "clip_skip", "high_noise_frac", "hires"];
let extras = {};
const modelDefaults = new Map();
const formDefaults = {};
const controlCards = new Map(); // ControlNet id -> its /v1/models card
const $ = (id) => document.getElementById(id);

// The pictures the form holds besides its fields.
const edit = { picture: null, undo: [] }; // picture: the Blob to edit
const control = { image: null, seq: 0, timer: null }; // image: a data: URL
const adapter = { images: [] }; // data: URLs
// Each finished image's figure -> the settings it was made with (pictures included).
const madeWith = new WeakMap();

function headers(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Resolves once the person has typed a key (the server answered 401). Calls
// that are refused together (the models and the jobs, at load) share one dialog.
let keyPrompt = null;
function askForKey() {
  keyPrompt = keyPrompt || new Promise((resolve) => {
    const dialog = $("key-dialog");
    dialog.addEventListener("close", () => {
      const key = $("key-input").value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      keyPrompt = null;
      resolve(Boolean(key));
    }, { once: true });
    dialog.showModal();
  });
  return keyPrompt;
}

// fetch, asking for an API key and trying again once when the server wants one.
async function call(path, options = {}) {
  let response = await fetch(API + path, { ...options, headers: headers(options.headers) });
  if (response.status === 401 && (await askForKey())) {
    response = await fetch(API + path, { ...options, headers: headers(options.headers) });
  }
  return response;
}

async function loadModels() {
  const response = await call("/models");
  if (!response.ok) return;
  const models = (await response.json()).data || [];
  const select = $("lora");
  for (const card of models) {
    if (card.owned_by === "models_dir") {
      addModel(card);
      continue;
    }
    if (card.owned_by === "controlnet_dir") {
      addChoice($("cn-model"), card, card.id);
      controlCards.set(card.id, card);
      $("control-section").hidden = false;
      continue;
    }
    if (card.owned_by === "ip_adapter_dir") {
      addChoice($("ipa-model"), card, card.id);
      $("ipa-section").hidden = false;
      continue;
    }
    if (card.warning) $("model-note").textContent = card.warning;
    if (!card.lora) continue;
    const option = document.createElement("option");
    option.value = card.lora.name;
    option.textContent = `${card.lora.name} (${card.lora.components.join(", ")})`;
    select.append(option);
  }
  showUnionMode();
}

// A ControlNet or IP-Adapter in its picker; one that cannot be used is shown, disabled, with why.
function addChoice(select, card, label) {
  const option = document.createElement("option");
  option.value = card.id;
  option.textContent = label;
  if (card.warning) {
    option.disabled = true;
    option.title = card.warning;
    option.textContent += " — cannot be used";
  }
  select.append(option);
  if (select.selectedOptions[0] && select.selectedOptions[0].disabled && !option.disabled) {
    select.value = card.id;
  }
}

// A model of SDXL_MODELS_DIR in the picker; one that cannot render is shown, disabled, with why.
function addModel(card) {
  const option = document.createElement("option");
  option.value = card.id;
  const details = card.details || {};
  const size = details.size_bytes ? ` ${(details.size_bytes / 2 ** 30).toFixed(2)} GiB` : "";
  option.textContent = `${card.id} (${details.format || "?"}${size})`;
  if (card.warning) {
    option.disabled = true;
    option.title = card.warning;
    option.textContent += " — cannot be used";
  }
  modelDefaults.set(card.id, details.defaults || {});
  $("model").append(option);
}

// Picking a model puts its defaults in the form (what the server would use), or the form's own.
function applyModelDefaults() {
  const defaults = modelDefaults.get($("model").value) || {};
  for (const field of DEFAULT_FIELDS) {
    $(field).value = field in defaults ? defaults[field] : formDefaults[field];
  }
}

function requestBody() {
  const value = (id) => $(id).value.trim();
  const body = {
    prompt: value("prompt"),
    size: value("size"),
    n: Number(value("n")),
    output_format: value("output_format"),
    num_inference_steps: Number(value("num_inference_steps")),
    guidance_scale: Number(value("guidance_scale")),
    refiner: value("refiner"),
    scheduler: value("scheduler"),
    stream: true,
    partial_images: Number(value("partial_images")),
  };
  if (value("negative_prompt")) body.negative_prompt = value("negative_prompt");
  if (value("seed") !== "") body.seed = Number(value("seed"));
  if (value("model")) body.model = value("model");
  if (value("lora")) body.loras = [{ name: value("lora"), scale: Number(value("lora_scale")) }];
  if (edit.picture && value("strength") !== "") body.strength = Number(value("strength"));
  // A1111's inpainting options: for a painted mask only (the server refuses them without one).
  if (maskPainted()) {
    if (value("mask_blur") !== "") body.mask_blur = Number(value("mask_blur"));
    if ($("only_masked").checked) {
      body.inpaint_area = "only_masked";
      if (value("inpaint_padding") !== "") body.inpaint_padding = Number(value("inpaint_padding"));
    }
  }
  if (!edit.picture) Object.assign(body, extras);
  if (control.image && value("cn-model")) body.controlnets = [controlUnit()];
  if (adapter.images.length && value("ipa-model")) {
    body.ip_adapters = [
      { name: value("ipa-model"), images: [...adapter.images], scale: Number(value("ipa-scale")) },
    ];
  }
  return body;
}

// The form's ControlNet unit, as `controlnets` takes it (docs/API.md#controlnet).
function controlUnit() {
  const number = (id) => Number($(id).value);
  const unit = {
    name: $("cn-model").value,
    image: control.image,
    preprocessor: $("cn-preprocessor").value,
    scale: number("cn-scale"),
    start: number("cn-start"),
    end: number("cn-end"),
  };
  if (unit.preprocessor === "canny") {
    unit.low = number("cn-low");
    unit.high = number("cn-high");
  }
  if (isUnion($("cn-model").value)) unit.mode = $("cn-mode").value;
  return unit;
}

function isUnion(name) {
  const card = controlCards.get(name);
  return Boolean(card && card.controlnet && card.controlnet.union);
}

function showUnionMode() {
  $("cn-mode-label").hidden = !isUnion($("cn-model").value);
}

// canny's thresholds only with canny.
function showThresholds() {
  const canny = $("cn-preprocessor").value === "canny";
  for (const label of document.querySelectorAll(".canny-only")) label.hidden = !canny;
}

// An edit's multipart form (POST /images/edits, or a job of kind edit): the JSON body's fields
// as text, lists as JSON text fields, the picture and the painted mask as files.
async function editForm(body) {
  const form = new FormData();
  for (const [field, value] of Object.entries(body)) {
    const text = typeof value === "object" ? JSON.stringify(value) : String(value);
    form.append(field, text);
  }
  form.append("image", edit.picture, edit.picture.name || "picture.png");
  const mask = await maskPng();
  if (mask) form.append("mask", mask, "mask.png");
  return form;
}

function showError(message) {
  const error = $("error");
  error.textContent = message;
  error.hidden = !message;
}

// One server-sent event block ("event: x\ndata: {...}") -> its JSON data.
function parseEvent(block) {
  const data = block.split("\n").filter((line) => line.startsWith("data:"));
  return data.length ? JSON.parse(data.map((line) => line.slice(5).trim()).join("\n")) : null;
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event) yield event;
    }
  }
}

// An image in the strip of this page's images (its previews first, in the same place); a
// finished one is shown large beside the form, and a click on it shows it there again.
function addImage(event, params, slot) {
  const figure = slot || document.createElement("figure");
  figure.replaceChildren();
  const image = document.createElement("img");
  image.src = `data:image/${event.output_format};base64,${event.b64_json}`;
  image.alt = params.prompt;
  const caption = document.createElement("figcaption");
  const partial = event.type.endsWith("partial_image");
  const label = document.createElement("span");
  label.textContent = partial ? `preview ${event.partial_image_index + 1}` : `seed ${event.seed}`;
  caption.append(label);
  if (partial) {
    figure.append(image, caption);
  } else {
    madeWith.set(figure, { ...params, seed: event.seed, n: 1 });
    figure.dataset.seed = String(event.seed);
    const thumb = document.createElement("button");
    thumb.type = "button";
    thumb.className = "thumb";
    thumb.title = "Show it again, with its settings";
    thumb.setAttribute("aria-label", `Show the image of seed ${event.seed}`);
    thumb.append(image);
    thumb.addEventListener("click", () => showLarge(figure));
    const download = document.createElement("a");
    download.href = image.src;
    download.download = `sdxl-${event.seed}.${event.output_format}`;
    download.textContent = "download";
    caption.append(download);
    figure.append(thumb, caption);
  }
  if (!slot) $("gallery").prepend(figure);
  if (!partial) {
    showLarge(figure);
    trimStrip();
  }
  return figure;
}

// Each finished image of the strip holds its picture, and an edit's, in the page's memory: the
// strip keeps the newest `data-keep` of them, so a long session does not grow without end.
function trimStrip() {
  const strip = $("gallery");
  const keep = Number(strip.dataset.keep);
  const finished = [...strip.querySelectorAll(":scope > figure[data-seed]")];
  for (const figure of finished.slice(keep)) figure.remove();
}

// The strip's `figure` large beside the form, with the settings it was made with.
function showLarge(figure) {
  const params = madeWith.get(figure);
  const image = figure.querySelector("img");
  for (const other of $("gallery").querySelectorAll("figure.shown")) other.classList.remove("shown");
  figure.classList.add("shown");
  $("viewer").hidden = false;
  $("viewer-image").src = image.src;
  $("viewer-image").alt = params.prompt;
  $("viewer-caption").textContent = `seed ${params.seed}`;
  $("viewer-download").href = image.src;
  $("viewer-download").download = figure.querySelector("a").download;
  $("viewer-settings").textContent = describe(params);
  $("viewer").dataset.seed = String(params.seed);
  shownParams = params;
}
let shownParams = null;

function describe(params) {
  const parts = [
    params.prompt,
    params.size,
    `${params.num_inference_steps} steps`,
    `guidance ${params.guidance_scale}`,
    params.scheduler,
    `refiner ${params.refiner}`,
  ];
  if (params.negative_prompt) parts.splice(1, 0, `not: ${params.negative_prompt}`);
  if (params.model) parts.push(`model ${params.model}`);
  for (const lora of params.loras || []) parts.push(`LoRA ${lora.name} ${lora.scale}`);
  if (params.edit) {
    const how = params.edit.mask ? "inpainted" : "edited";
    parts.push(`${how}${params.strength ? `, strength ${params.strength}` : ""}`);
    if (params.mask_blur) parts.push(`mask blur ${params.mask_blur}`);
    if (params.inpaint_area === "only_masked") parts.push("only masked");
  }
  for (const unit of params.controlnets || []) {
    parts.push(`ControlNet ${unit.name} (${unit.preprocessor}, ${unit.scale})`);
  }
  for (const unit of params.ip_adapters || []) {
    parts.push(`IP-Adapter ${unit.name} (${unit.images.length} pictures, ${unit.scale})`);
  }
  return parts.join(" · ");
}

// The form as `params` were: its fields, and the pictures to edit, control and prompt with.
async function reuse(params) {
  $("size-auto").disabled = !params.edit;
  extras = Object.fromEntries(EXTRA_FIELDS.filter((f) => f in params).map((f) => [f, params[f]]));
  showExtras();
  for (const field of ["size", "scheduler"]) {
    if (params[field]) addOption($(field), params[field]);
  }
  for (const field of FIELDS) {
    if (field in params && $(field)) $(field).value = params[field] ?? "";
  }
  $("model").value = params.model || "";
  $("strength").value = params.strength ?? "";
  $("mask_blur").value = params.mask_blur ?? "";
  $("only_masked").checked = params.inpaint_area === "only_masked";
  $("inpaint_padding").value = params.inpaint_padding ?? "";
  if (params.loras && params.loras[0]) {
    $("lora").value = params.loras[0].name;
    $("lora_scale").value = params.loras[0].scale;
  } else {
    $("lora").value = "";
  }
  const unit = params.controlnets && params.controlnets[0];
  if (unit) {
    $("cn-model").value = unit.name;
    $("cn-preprocessor").value = unit.preprocessor;
    for (const field of ["scale", "start", "end", "low", "high"]) {
      if (field in unit) $(`cn-${field}`).value = unit[field];
    }
    if (unit.mode !== undefined) $("cn-mode").value = unit.mode;
    showUnionMode();
    showThresholds();
    setControlImage(unit.image);
  } else {
    setControlImage(null);
  }
  const adapterUnit = params.ip_adapters && params.ip_adapters[0];
  if (adapterUnit) {
    $("ipa-model").value = adapterUnit.name;
    $("ipa-scale").value = adapterUnit.scale;
  }
  setAdapterImages(adapterUnit ? adapterUnit.images : []);
  if (params.edit) await setEditPicture(params.edit.picture, params.edit.mask, { keepSize: true });
  else setEditPicture(null);
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// A value the select has no option for (a size or scheduler of another image), added to it.
function addOption(select, value) {
  if ([...select.options].some((option) => option.value === value)) return;
  const option = document.createElement("option");
  option.textContent = value;
  select.append(option);
}

function showExtras(unused = []) {
  const sent = Object.entries(extras).map(([key, value]) => `${key} ${JSON.stringify(value)}`);
  const parts = [];
  if (sent.length) parts.push(`Also sent with generations: ${sent.join(", ")}.`);
  if (unused.length) parts.push(`Not used here: ${unused.join(", ")}.`);
  $("infotext-note").textContent = parts.join(" ");
}

// AUTOMATIC1111's PNG Info: the settings an image's infotext holds (POST /v1/images/infotext),
// put in the form as "Use these settings" puts an image's of this page.
async function readSettings(file) {
  if (!file) return;
  showError("");
  const form = new FormData();
  form.append("image", file);
  const response = await call("/images/infotext", { method: "POST", body: form });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    showError(errorMessage(body, response));
    return;
  }
  if (!body.infotext) {
    $("infotext-note").textContent = "This image holds no settings (no infotext).";
    return;
  }
  await reuse(body.request);
  showExtras(body.unused);
}

async function generate(submit) {
  submit.preventDefault();
  showError("");
  const params = requestBody();
  const button = $("generate");
  button.disabled = true;
  $("status").textContent = "generating…";
  try {
    let response;
    if (edit.picture) {
      const form = await editForm(params);
      // Kept with its images, so a click on one puts the picture and its mask back.
      const mask = form.has("mask") ? $("mask-canvas").toDataURL() : null;
      params.edit = { picture: edit.picture, mask };
      response = await call("/images/edits", { method: "POST", body: form });
    } else {
      response = await call("/images/generations", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(params),
      });
    }
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      showError(body && body.error ? body.error.message : `HTTP ${response.status}`);
      return;
    }
    // An image's previews, then the image itself, take one place in the
    // gallery; the images of one request render together, so their events
    // interleave, and each carries its seed.
    const places = new Map();
    let completed = 0;
    for await (const event of events(response)) {
      if (event.type === "error" || event.error) {
        showError((event.error && event.error.message) || "the generation failed");
        break;
      }
      const place = places.get(event.seed);
      const figure = addImage(event, params, place && place.figure);
      if (event.type.endsWith("partial_image")) {
        places.set(event.seed, { figure, previews: (place ? place.previews : 0) + 1 });
      } else {
        figure.dataset.previews = String(place ? place.previews : 0);
        places.delete(event.seed);
        completed += 1;
      }
      $("status").textContent = `${completed} of ${params.n} done`;
    }
  } catch (error) {
    showError(String(error));
  } finally {
    button.disabled = false;
    if (!$("error").hidden) $("status").textContent = "";
  }
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot read this picture"));
    image.src = src;
  });
}

// ---- The picture to edit, and the mask painted on it ----------------------

// `picture`: a Blob (or null: no edit); `mask`: a painted overlay to put back (a data: URL).
// A new picture is edited at its own size ("auto") unless `keepSize` (its settings put back).
async function setEditPicture(picture, mask = null, { keepSize = false } = {}) {
  edit.picture = picture;
  edit.undo = [];
  const shown = Boolean(picture);
  for (const id of ["paint", "mask-tools", "inpaint-options", "edit-hint"]) $(id).hidden = !shown;
  $("size-auto").disabled = !shown;
  if (!picture) {
    $("edit-image").value = "";
    // "auto" is an edit's size only: a generation takes the size it had before.
    if ($("size").value === "auto") $("size").value = edit.sizeBefore || "1024x1024";
    return;
  }
  if (!keepSize && $("size").value !== "auto") {
    edit.sizeBefore = $("size").value;
    $("size").value = "auto";
  }
  const url = URL.createObjectURL(picture);
  try {
    const image = await loadImage(url);
    const canvas = $("edit-canvas");
    const overlay = $("mask-canvas");
    // The canvases are the picture's own size: the mask must be (docs/API.md#edits-and-variations).
    for (const each of [canvas, overlay]) {
      each.width = image.naturalWidth;
      each.height = image.naturalHeight;
    }
    canvas.getContext("2d").drawImage(image, 0, 0);
    if (mask) overlay.getContext("2d").drawImage(await loadImage(mask), 0, 0);
    $("edit-section").open = true;
    if ($("size").value === "auto") schedulePreview(0);
  } catch (error) {
    showError(String(error.message || error));
    setEditPicture(null);
  } finally {
    URL.revokeObjectURL(url);
  }
}

let stroke = null; // the last point of the stroke being painted

function maskPoint(pointer) {
  const overlay = $("mask-canvas");
  const box = overlay.getBoundingClientRect();
  const scale = overlay.width / box.width;
  return { x: (pointer.clientX - box.left) * scale, y: (pointer.clientY - box.top) * scale, scale };
}

function paint(from, to) {
  const context = $("mask-canvas").getContext("2d");
  context.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = "#ff2d2d";
  // The brush is sized on the screen: the same stroke whatever the picture's resolution.
  const width = Number($("brush-size").value) * from.scale;
  context.lineWidth = width;
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  if (from === to) {
    context.arc(from.x, from.y, width / 2, 0, 2 * Math.PI);
    context.fill();
  } else {
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }
}

function rememberMask() {
  const overlay = $("mask-canvas");
  const context = overlay.getContext("2d");
  edit.undo.push(context.getImageData(0, 0, overlay.width, overlay.height));
  if (edit.undo.length > MASK_UNDO_STEPS) edit.undo.shift();
}

function startStroke(pointer) {
  if (pointer.button !== 0) return;
  pointer.preventDefault();
  $("mask-canvas").setPointerCapture(pointer.pointerId);
  rememberMask();
  stroke = maskPoint(pointer);
  paint(stroke, stroke);
}

function continueStroke(pointer) {
  if (!stroke) return;
  const point = maskPoint(pointer);
  paint(stroke, point);
  stroke = point;
}

function undoMask() {
  const last = edit.undo.pop();
  if (last) $("mask-canvas").getContext("2d").putImageData(last, 0, 0);
}

function clearMask() {
  const overlay = $("mask-canvas");
  rememberMask();
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
}

// Painted: a pixel at least half covered, as the server reads the mask.
function isPainted(alpha) {
  return alpha >= MASK_ALPHA_THRESHOLD;
}

function maskPainted() {
  const overlay = $("mask-canvas");
  if (!edit.picture || !overlay.width) return false;
  const { data } = overlay.getContext("2d").getImageData(0, 0, overlay.width, overlay.height);
  for (let index = 3; index < data.length; index += 4) if (isPainted(data[index])) return true;
  return false;
}

// The mask as OpenAI's edits take it: a PNG of the picture's size, transparent (alpha 0) where
// painted, opaque black elsewhere; null when nothing is painted (an edit of the whole picture).
async function maskPng() {
  if (!maskPainted()) return null;
  const overlay = $("mask-canvas");
  const painted = overlay.getContext("2d").getImageData(0, 0, overlay.width, overlay.height);
  const mask = new ImageData(overlay.width, overlay.height);
  for (let index = 3; index < mask.data.length; index += 4) {
    mask.data[index] = isPainted(painted.data[index]) ? 0 : 255;
  }
  const canvas = document.createElement("canvas");
  canvas.width = overlay.width;
  canvas.height = overlay.height;
  canvas.getContext("2d").putImageData(mask, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// ---- The ControlNet's control image and its map ---------------------------

function setControlImage(dataUrl) {
  control.image = dataUrl;
  $("cn-source-figure").hidden = !dataUrl;
  $("cn-remove").hidden = !dataUrl;
  if (dataUrl) {
    $("cn-source").src = dataUrl;
    $("control-section").open = true;
  } else {
    $("cn-image").value = "";
    $("cn-preview-figure").hidden = true;
  }
  showControlError("");
  schedulePreview(0);
}

function showControlError(message) {
  $("cn-error").textContent = message;
  $("cn-error").hidden = !message;
}

function schedulePreview(delay = PREVIEW_DELAY_MS) {
  clearTimeout(control.timer);
  control.timer = setTimeout(() => previewMap().catch((error) => showControlError(String(error))), delay);
}

// The size asked: "auto" is the edit picture's own, in multiples of 8 (as the server takes it
// when the picture is within its size limits; outside them the preview says so).
function renderSize() {
  if ($("size").value !== "auto") return $("size").value.split("x").map(Number);
  const canvas = $("edit-canvas");
  if (!edit.picture || !canvas.width) return null;
  return [canvas.width, canvas.height].map((side) => Math.max(8, Math.round(side / 8) * 8));
}

// The map the render will use, made by the server as the render makes it
// (POST /v1/images/control-maps), at the size asked.
async function previewMap() {
  const seq = ++control.seq;
  if (!control.image) return;
  const size = renderSize();
  if (!size) return;
  const [width, height] = size;
  const preprocessor = $("cn-preprocessor").value;
  const body = { image: control.image, preprocessor, width, height };
  if (preprocessor === "canny") {
    body.low = Number($("cn-low").value);
    body.high = Number($("cn-high").value);
  }
  const response = await call("/images/control-maps", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => null);
  if (seq !== control.seq) return; // a newer preview is on its way
  if (!response.ok) {
    $("cn-preview-figure").hidden = true;
    showControlError(errorMessage(answer, response));
    return;
  }
  showControlError("");
  $("cn-preview").src = `data:image/png;base64,${answer.data[0].b64_json}`;
  $("cn-preview-caption").textContent = `${preprocessor === "canny" ? "canny map" : "as used"}, ${answer.size}`;
  $("cn-preview-figure").hidden = false;
}

// ---- The IP-Adapter's pictures --------------------------------------------

function setAdapterImages(images) {
  adapter.images = images.slice(0, MAX_IP_ADAPTER_IMAGES);
  const thumbs = adapter.images.map((src, index) => {
    const image = document.createElement("img");
    image.src = src;
    image.alt = `IP-Adapter picture ${index + 1}`;
    const figure = document.createElement("figure");
    figure.append(image);
    return figure;
  });
  $("ipa-thumbs").replaceChildren(...thumbs);
  $("ipa-remove").hidden = adapter.images.length === 0;
  if (adapter.images.length) $("ipa-section").open = true;
  else $("ipa-images").value = "";
}

async function adapterImagesChosen() {
  const files = [...$("ipa-images").files];
  if (files.length > MAX_IP_ADAPTER_IMAGES) {
    showError(`An IP-Adapter takes at most ${MAX_IP_ADAPTER_IMAGES} pictures: the first ${MAX_IP_ADAPTER_IMAGES} are used.`);
  }
  setAdapterImages(await Promise.all(files.slice(0, MAX_IP_ADAPTER_IMAGES).map(readAsDataUrl)));
}

// Image jobs (/v1/images/jobs): queued from the form, listed from the server
// (with API keys, a key sees only its own jobs), so a reload shows them again.
const JOB_PAGE = 20;
const POLL_MS = 1000;
const POLL_AFTER_ERROR_MS = 5000;
const METADATA_MAX_CHARS = 512;
const shownJobs = new Map(); // id -> { job, element, drawn }
let pollTimer = null;
let olderAfter = null;

const isActive = (job) => job.status === "queued" || job.status === "running";

function errorMessage(body, response) {
  return body && body.error ? body.error.message : `HTTP ${response.status}`;
}

function showJobsError(message) {
  $("jobs-error").textContent = message;
  $("jobs-error").hidden = !message;
}

// The synchronous call's body, answered once at the end: a job takes no stream
// (nor its previews). The prompt goes into metadata: the job object does not
// carry its request, and the panel shows it after a reload.
function jobBody() {
  const body = requestBody();
  delete body.stream;
  delete body.partial_images;
  body.metadata = { prompt: body.prompt.slice(0, METADATA_MAX_CHARS) };
  return body;
}

async function queueJob() {
  if (!$("form").reportValidity()) return;
  showError("");
  const button = $("queue-job");
  button.disabled = true;
  try {
    const job = jobBody();
    // An edit is a job of kind edit, sent as the edit endpoint's form.
    const options = edit.picture
      ? { method: "POST", body: await editForm({ ...job, kind: "edit" }) }
      : {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(job),
      };
    const response = await call("/images/jobs", options);
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      showError(errorMessage(body, response));
      return;
    }
    showJob(body, { newest: true });
    schedulePoll();
  } catch (error) {
    showError(String(error));
  } finally {
    button.disabled = false;
  }
}

function showJob(job, { newest = false } = {}) {
  let entry = shownJobs.get(job.id);
  if (!entry) {
    const element = document.createElement("article");
    element.className = "job";
    element.dataset.jobId = job.id;
    entry = { element, drawn: "" };
    shownJobs.set(job.id, entry);
    if (newest) $("job-list").prepend(element);
    else $("job-list").append(element);
  }
  entry.job = job;
  drawJob(entry);
  $("jobs").hidden = false;
}

function forgetJob(id) {
  const entry = shownJobs.get(id);
  if (entry) entry.element.remove();
  shownJobs.delete(id);
  if (shownJobs.size === 0 && $("jobs-error").hidden) $("jobs").hidden = true;
}

function jobState(job) {
  const progress = job.progress || {};
  if (job.status === "queued") {
    return job.queue_position === null ? "queued" : `queued, ${job.queue_position} ahead`;
  }
  if (job.status === "running") return `running, step ${progress.step || 0} of ${progress.steps}`;
  return job.status;
}

// Drawn again only when something shown changed, so a poll does not decode
// a finished job's images again.
function drawJob(entry) {
  const { job, element } = entry;
  const progress = job.progress || {};
  const drawn = [job.status, progress.step, progress.steps, job.queue_position].join("|");
  if (drawn === entry.drawn) return;
  entry.drawn = drawn;
  element.dataset.status = job.status;
  const head = document.createElement("div");
  head.className = "job-head";
  const prompt = document.createElement("span");
  prompt.className = "job-prompt";
  prompt.textContent = (job.metadata && job.metadata.prompt) || job.id;
  const state = document.createElement("span");
  state.className = "job-state";
  state.textContent = jobState(job);
  const action = document.createElement("button");
  action.type = "button";
  action.className = "secondary";
  if (isActive(job)) {
    action.textContent = "Cancel";
    action.dataset.action = "cancel";
    action.addEventListener("click", () => jobAction(job.id, "cancel"));
  } else {
    action.textContent = "Delete";
    action.dataset.action = "delete";
    action.addEventListener("click", () => jobAction(job.id, "delete"));
  }
  head.append(prompt, state, action);
  const parts = [head];
  if (progress.steps) {
    const bar = document.createElement("progress");
    bar.max = progress.steps;
    bar.value = job.status === "succeeded" ? progress.steps : Math.min(progress.step || 0, progress.steps);
    parts.push(bar);
  }
  if (job.status === "succeeded" && job.result) parts.push(jobImages(job.result));
  if (job.error && job.error.message) {
    const error = document.createElement("p");
    error.className = "error job-error";
    error.textContent = job.error.message;
    parts.push(error);
  }
  element.replaceChildren(...parts);
}

function jobImages(result) {
  const images = document.createElement("div");
  images.className = "job-images";
  for (const item of result.data || []) {
    const figure = document.createElement("figure");
    let image = document.createElement("img");
    image.alt = `seed ${item.seed}`;
    if (item.b64_json) {
      image.src = `data:image/${result.output_format};base64,${item.b64_json}`;
    } else if (item.url) {
      imageFromUrl(image, item.url);
    } else if (item.error) {
      // Withheld by the safety checker (SDXL_SAFETY_CHECKER): its place says why.
      image = document.createElement("p");
      image.className = "error job-withheld";
      image.textContent = item.error.message;
    }
    const caption = document.createElement("figcaption");
    const label = document.createElement("span");
    label.textContent = `seed ${item.seed}`;
    caption.append(label);
    figure.append(image, caption);
    images.append(figure);
  }
  return images;
}

// A url result is fetched with the API key (an <img> cannot send one) when it
// is this server's own file, and shown as given otherwise (an S3 address).
async function imageFromUrl(image, url) {
  const own = new URL(url, location.href);
  if (own.origin !== location.origin || !own.pathname.startsWith(API + "/")) {
    image.src = url;
    return;
  }
  const response = await call(own.pathname.slice(API.length) + own.search);
  if (response.ok) image.src = URL.createObjectURL(await response.blob());
  else image.alt = `HTTP ${response.status}`;
}

async function jobAction(id, action) {
  showJobsError("");
  const path = `/images/jobs/${encodeURIComponent(id)}`;
  try {
    const response = action === "cancel"
      ? await call(`${path}/cancel`, { method: "POST" })
      : await call(path, { method: "DELETE" });
    const body = await response.json().catch(() => null);
    if (response.ok && action === "delete") forgetJob(id);
    else if (response.ok) showJob(body);
    else {
      // Most likely it ended meanwhile (409): show it as it is now.
      showJobsError(errorMessage(body, response));
      await refreshJob(id);
    }
  } catch (error) {
    showJobsError(String(error));
  }
  schedulePoll();
}

async function refreshJob(id) {
  const response = await call(`/images/jobs/${encodeURIComponent(id)}`);
  if (response.status === 404) forgetJob(id); // deleted elsewhere, or expired
  else if (response.ok) showJob(await response.json());
  else throw new Error(errorMessage(await response.json().catch(() => null), response));
}

// One timer at most, and none while no shown job is queued or running.
function schedulePoll(delay = POLL_MS) {
  const waiting = [...shownJobs.values()].some((entry) => isActive(entry.job));
  if (pollTimer === null && waiting) pollTimer = setTimeout(poll, delay);
}

async function poll() {
  let delay = POLL_MS;
  try {
    const active = [...shownJobs.values()].filter((entry) => isActive(entry.job));
    await Promise.all(active.map((entry) => refreshJob(entry.job.id)));
    showJobsError("");
  } catch (error) {
    showJobsError(`Could not check the jobs: ${error.message || error}`);
    delay = POLL_AFTER_ERROR_MS;
  } finally {
    pollTimer = null;
    schedulePoll(delay);
  }
}

async function loadJobs() {
  const query = `?limit=${JOB_PAGE}` + (olderAfter ? `&after=${encodeURIComponent(olderAfter)}` : "");
  const response = await call(`/images/jobs${query}`);
  if (response.status === 404 && !olderAfter) {
    $("queue-job").hidden = true; // image jobs are not enabled on this server
    return;
  }
  const page = await response.json().catch(() => null);
  if (!response.ok) {
    showJobsError(errorMessage(page, response));
    $("jobs").hidden = false;
    return;
  }
  for (const job of page.data) showJob(job);
  olderAfter = page.has_more ? page.last_id : null;
  $("jobs-more").hidden = !page.has_more;
  schedulePoll();
}

for (const field of DEFAULT_FIELDS) formDefaults[field] = $(field).value;
$("queue-job").addEventListener("click", queueJob);
$("jobs-more").addEventListener("click", () => loadJobs().catch((error) => showJobsError(String(error))));
$("model").addEventListener("change", applyModelDefaults);
$("form").addEventListener("submit", generate);
$("viewer-reuse").addEventListener("click", () => shownParams && reuse(shownParams));
$("infotext-image").addEventListener("change", () => {
  readSettings($("infotext-image").files[0]).catch((error) => showError(String(error)));
});
// An image dropped on the form (not on one of its file inputs, which take their own): its settings.
$("form").addEventListener("dragover", (event) => {
  if (event.target.type !== "file") event.preventDefault();
});
$("form").addEventListener("drop", (event) => {
  if (event.target.type === "file" || !event.dataTransfer.files.length) return;
  event.preventDefault();
  readSettings(event.dataTransfer.files[0]).catch((error) => showError(String(error)));
});
$("edit-image").addEventListener("change", () => setEditPicture($("edit-image").files[0] || null));
$("edit-remove").addEventListener("click", () => setEditPicture(null));
$("mask-canvas").addEventListener("pointerdown", startStroke);
$("mask-canvas").addEventListener("pointermove", continueStroke);
for (const end of ["pointerup", "pointercancel"]) {
  $("mask-canvas").addEventListener(end, () => { stroke = null; });
}
$("mask-undo").addEventListener("click", undoMask);
$("mask-clear").addEventListener("click", clearMask);
$("cn-image").addEventListener("change", async () => {
  const file = $("cn-image").files[0];
  setControlImage(file ? await readAsDataUrl(file) : null);
});
$("cn-remove").addEventListener("click", () => setControlImage(null));
$("cn-model").addEventListener("change", showUnionMode);
$("cn-preprocessor").addEventListener("change", showThresholds);
for (const id of ["cn-preprocessor", "cn-low", "cn-high", "size"]) {
  $(id).addEventListener("input", () => schedulePreview());
}
$("ipa-images").addEventListener("change", () => adapterImagesChosen().catch((error) => showError(String(error))));
$("ipa-remove").addEventListener("click", () => setAdapterImages([]));
loadModels().catch((error) => showError(String(error)));
loadJobs().catch((error) => showJobsError(String(error)));
