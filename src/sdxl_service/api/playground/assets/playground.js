// The playground: the service's own /v1 API, streamed, shown as it comes.
"use strict";

const API = "/v1";
const KEY_STORAGE = "sdxl-playground-api-key";
const FIELDS = [
  "prompt", "negative_prompt", "size", "n", "output_format", "seed",
  "num_inference_steps", "guidance_scale", "refiner", "scheduler", "lora", "lora_scale",
  "partial_images", "model",
];
// A model's sidecar defaults, by the form field each fills when the model is picked.
const DEFAULT_FIELDS = {
  steps: "num_inference_steps", guidance_scale: "guidance_scale",
  scheduler: "scheduler", refiner: "refiner",
};
const modelDefaults = new Map();
const formDefaults = {};
const $ = (id) => document.getElementById(id);

function headers(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Resolves once the person has typed a key (the server answered 401).
function askForKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    dialog.addEventListener("close", () => {
      const key = $("key-input").value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      resolve(Boolean(key));
    }, { once: true });
    dialog.showModal();
  });
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
    if (card.warning) $("model-note").textContent = card.warning;
    if (!card.lora) continue;
    const option = document.createElement("option");
    option.value = card.lora.name;
    option.textContent = `${card.lora.name} (${card.lora.components.join(", ")})`;
    select.append(option);
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
  for (const [key, field] of Object.entries(DEFAULT_FIELDS)) {
    $(field).value = key in defaults ? defaults[key] : formDefaults[field];
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
  return body;
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
  if (!partial) {
    figure.dataset.params = JSON.stringify({ ...params, seed: event.seed, n: 1 });
    image.title = "Use these settings again";
    image.addEventListener("click", () => reuse(JSON.parse(figure.dataset.params)));
    const download = document.createElement("a");
    download.href = image.src;
    download.download = `sdxl-${event.seed}.${event.output_format}`;
    download.textContent = "download";
    caption.append(download);
  }
  figure.append(image, caption);
  if (!slot) $("gallery").prepend(figure);
  return figure;
}

function reuse(params) {
  for (const field of FIELDS) {
    if (field in params && $(field)) $(field).value = params[field] ?? "";
  }
  $("model").value = params.model || "";
  if (params.loras && params.loras[0]) {
    $("lora").value = params.loras[0].name;
    $("lora_scale").value = params.loras[0].scale;
  }
  window.scrollTo({ top: 0, behavior: "smooth" });
}

async function generate(submit) {
  submit.preventDefault();
  showError("");
  const params = requestBody();
  const button = $("generate");
  button.disabled = true;
  $("status").textContent = "generating…";
  try {
    const response = await call("/images/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(params),
    });
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

for (const field of Object.values(DEFAULT_FIELDS)) formDefaults[field] = $(field).value;
$("model").addEventListener("change", applyModelDefaults);
$("form").addEventListener("submit", generate);
loadModels().catch((error) => showError(String(error)));
