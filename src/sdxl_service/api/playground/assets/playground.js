// The playground: the service's own /v1 API, streamed, shown as it comes.
"use strict";

const API = "/v1";
const KEY_STORAGE = "sdxl-playground-api-key";
const FIELDS = [
  "prompt", "negative_prompt", "size", "n", "output_format", "seed",
  "num_inference_steps", "guidance_scale", "refiner", "scheduler", "lora", "lora_scale",
  "partial_images", "model",
];
// A model's sidecar defaults (named as the request's fields) the form shows when it is picked.
const DEFAULT_FIELDS = ["num_inference_steps", "guidance_scale", "scheduler", "refiner"];
const modelDefaults = new Map();
const formDefaults = {};
const $ = (id) => document.getElementById(id);

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
    const response = await call("/images/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(jobBody()),
    });
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
    const image = document.createElement("img");
    image.alt = `seed ${item.seed}`;
    if (item.b64_json) {
      image.src = `data:image/${result.output_format};base64,${item.b64_json}`;
    } else if (item.url) {
      imageFromUrl(image, item.url);
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
loadModels().catch((error) => showError(String(error)));
loadJobs().catch((error) => showJobsError(String(error)));
