// The smoothcert console: sign in, certify an image, watch the job, read the certificate;
// the jobs of this tab; evaluations; the model registry. It calls the HTTP API only, and puts
// every string the API returns into the page as text (textContent), never as HTML.

import { ApiError, call, getKey, jobs, json, rememberJob, setKey, signOut } from "./api.js";
import { decode, draw, generator, noisy, shifted } from "./picture.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_WAIT = 1; // seconds per long-poll: the job's end answers at once, progress at least every second

const state = {
  models: [],
  limits: null,
  memory: null, // GET /v1/models/{name}/memory of the selected model: its levels and minimum n
  image: null, // {blob, name}: the input chosen
  decoded: null, // its pixels for the pictures, or null
  inputs: new Map(), // job id → the decoded input it was submitted with (pictures)
  memoryTouched: false,
  curveUrl: null,
  session: 0, // bumped by sign-out, so that a sign-in still under way does not store its key after it
};

// --- small helpers -----------------------------------------------------------------------

/** x rounded down to k decimals, as text: a radius or a bound is never shown larger than it is. */
export function floorTo(x, k) {
  const scale = 10 ** k;
  return (Math.floor(x * scale) / scale).toFixed(k);
}

function ceilTo(x, k) {
  const scale = 10 ** k;
  return (Math.ceil(x * scale) / scale).toFixed(k);
}

const count = (n) => Number(n).toLocaleString("en-US");

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function setText(id, text) {
  $(id).textContent = text ? String(text) : "";
}

function showError(id, error) {
  setText(id, error instanceof ApiError ? error.toString() : error ? error.message || String(error) : "");
}

function addField(list, name, value, valueId) {
  list.append(element("dt", name));
  const dd = element("dd");
  if (value instanceof Node) dd.append(value);
  else dd.textContent = String(value);
  if (valueId) dd.id = valueId;
  list.append(dd);
}

function selectedModel(selectId = "cert-model") {
  return state.models.find((m) => m.name === $(selectId).value) || null;
}

function numberOf(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : raw;
}

// --- sign in, views ----------------------------------------------------------------------

async function enter(key, focus = false) {
  const session = state.session;
  const listed = await json("v1/models", { key });
  if (session !== state.session) return;
  setKey(key);
  $("who").textContent = key ? "Signed in with an API key" : "Open API: no key needed";
  $("sign-out").hidden = !key;
  $("nav").hidden = false;
  $("signin-key").value = "";
  state.limits = await json("v1/limits").catch(() => null);
  renderModels(listed.models);
  await loadExamples();
  showView("certify", focus);
}

async function signIn(event) {
  event.preventDefault();
  setText("signin-error", "");
  const key = $("signin-key").value.trim();
  try {
    await enter(key, true);
  } catch (error) {
    showError("signin-error", error);
    $("signin-key").focus();
  }
}

function showSignIn(message) {
  for (const section of document.querySelectorAll("main > section")) section.hidden = true;
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "Not signed in";
  $("view-signin").hidden = false;
  setText("signin-error", message);
  $("signin-key").focus();
}

function leave() {
  state.session += 1;
  certPanel.stop();
  evalPanel.stop();
  signOut();
  state.inputs.clear();
  $("certificate").hidden = true;
  $("cert-job").hidden = true;
  $("eval-job").hidden = true;
  $("eval-result").hidden = true;
  showSignIn("");
}

function showView(name, focus = true) {
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `view-${name}`;
  for (const button of document.querySelectorAll("nav button")) {
    if (button.dataset.view === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (name === "jobs") renderJobs();
  if (name === "models") refreshModels();
  if (focus) {
    const heading = document.querySelector(`#view-${name} h2`);
    heading.tabIndex = -1;
    heading.focus();
  }
}

// --- models ------------------------------------------------------------------------------

function fillSelect(select, names) {
  const keep = select.value;
  select.replaceChildren(...names.map((name) => element("option", name, { value: name })));
  if (names.includes(keep)) select.value = keep;
}

function renderModels(models) {
  state.models = models;
  const names = models.map((m) => m.name);
  for (const id of ["cert-model", "eval-model", "delete-model"]) fillSelect($(id), names);
  const body = $("models-table").querySelector("tbody");
  body.replaceChildren(...models.map((m) => {
    const row = element("tr");
    row.append(element("td", m.name), element("td", m.kind), element("td", `[${m.input_shape.join(", ")}]`),
      element("td", `${m.num_classes}: ${m.labels.slice(0, 10).join(", ")}${m.labels.length > 10 ? ", …" : ""}`),
      element("td", `${m.sigma.default} [${m.sigma.min}, ${m.sigma.max}]`));
    const digest = element("td");
    digest.append(element("code", m.digest));
    row.append(digest);
    return row;
  }));
  if (!models.length) setText("models-error", "No model is registered: an admin uploads one below.");
  modelChanged();
  evalModelChanged();
}

async function refreshModels() {
  setText("models-error", "");
  try {
    renderModels((await json("v1/models")).models);
  } catch (error) {
    showError("models-error", error);
  }
}

async function modelChanged() {
  const model = selectedModel();
  state.memory = null;
  if (!model) {
    setText("model-info", "");
    return;
  }
  const [c, h, w] = model.input_shape;
  setText("model-info", `${model.kind} model, input [${c}, ${h}, ${w}] (${h}×${w}, ${c === 1 ? "greyscale" : `${c} channels`}), `
    + `${model.num_classes} classes, digest ${model.digest.slice(0, 19)}…`);
  const sigma = $("sigma");
  sigma.min = model.sigma.min;
  sigma.max = model.sigma.max;
  sigma.value = model.sigma.default;
  const selector = model.kind === "selector";
  setText("sigma-range", selector
    ? `A σ selector: it chooses σ among ${model.spec.selector.sigmas.join(", ")} for each input, with a certified `
      + "choice, and needs no memory."
    : `This model's σ: default ${model.sigma.default}, from ${model.sigma.min} to ${model.sigma.max}.`);
  const drs = model.kind === "drs";
  $("bound").replaceChildren(...(drs ? ["drs"] : ["cohen", "two_sided"]).map((b) => element("option", b, { value: b })));
  $("sigma-search").disabled = drs || model.kind === "remote" || selector;
  $("sigma-fixed").disabled = selector;
  if ($("sigma-search").disabled) $("sigma-fixed").checked = true;
  $("memory").disabled = selector;
  if (selector) {
    $("memory").checked = false;
    state.memoryTouched = true;
  }
  try {
    state.memory = await json(`v1/models/${encodeURIComponent(model.name)}/memory`);
  } catch {
    state.memory = null;
  }
  formChanged();
  await preview();
}

// --- the certification form ----------------------------------------------------------------

function memoryLevels() {
  return state.memory ? state.memory.levels : state.limits ? state.limits.memory.levels : [0.001, 0.01, 0.05];
}

function formChanged() {
  const search = $("sigma-search").checked;
  if (!state.memoryTouched) $("memory").checked = search;
  const memory = $("memory").checked;
  $("sigma").disabled = search || selectedModel()?.kind === "selector";
  $("search-method").disabled = !search;
  $("tolerance-field").hidden = $("sampling").value !== "adaptive";
  $("target-field").hidden = $("sampling").value !== "sequential";
  $("alpha-field").hidden = memory;
  $("alpha-level-field").hidden = !memory;
  const levels = memoryLevels();
  const level = $("alpha-level");
  if ([...level.options].map((o) => o.value).join() !== levels.map(String).join()) {
    level.replaceChildren(...levels.map((a) => element("option", String(a), { value: String(a) })));
  }
  $("seed").disabled = memory;
  if (memory) $("seed").value = "";
  const minN = state.memory ? state.memory.min_n : state.limits ? state.limits.memory.min_n : 1000;
  const parts = [];
  if (state.limits) {
    const l = state.limits;
    $("n").max = l.max_n;
    $("n0").max = l.max_n0;
    $("alpha").max = l.max_alpha;
    parts.push(`n ≤ ${count(l.max_n)} (SMOOTHCERT_MAX_N), n0 ≤ ${count(l.max_n0)}, α ≤ ${l.max_alpha} `
      + "(SMOOTHCERT_MAX_ALPHA).");
  }
  parts.push(memory
    ? `With the memory: α one of ${levels.join(", ")}, n ≥ ${count(minN)}, and the service draws the seed.`
    : "Memory off: any α up to the maximum, and a seed of your own is allowed.");
  setText("limits", parts.join(" "));
}

async function loadExamples() {
  let names = [];
  try {
    names = (await json("console/examples")).examples;
  } catch {
    names = [];
  }
  fillSelect($("example"), names);
  if (names.includes("digit-7.png")) $("example").value = "digit-7.png";
  $("src-example").disabled = !names.length;
  $("example").disabled = !names.length;
  if (!names.length) $("src-upload").checked = true;
  $("eval-builtin").disabled = !names.some((n) => /^digit-[0-9]\.png$/.test(n));
  if ($("eval-builtin").disabled) $("eval-upload").checked = true;
  await chooseImage();
}

async function chooseImage() {
  state.image = null;
  setText("certify-error", "");
  try {
    if ($("src-example").checked && $("example").value) {
      const name = $("example").value;
      const blob = await (await call(`console/examples/${encodeURIComponent(name)}`, { key: "" })).blob();
      state.image = { blob, name };
    } else if ($("src-upload").checked && $("upload").files.length) {
      const file = $("upload").files[0];
      state.image = { blob: file, name: file.name };
    }
  } catch (error) {
    showError("certify-error", error);
  }
  await preview();
}

async function preview() {
  const model = selectedModel();
  const canvas = $("input-preview");
  state.decoded = null;
  if (!state.image) {
    setText("input-note", "Choose an example or a file.");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    return;
  }
  const channels = model ? model.input_shape[0] : 1;
  const decoded = await decode(state.image.blob, channels);
  if (!decoded) {
    setText("input-note", `${state.image.name}: no preview here; the service decodes it and says if it does not fit.`);
    return;
  }
  state.decoded = decoded;
  draw(canvas, decoded.pixels, decoded.shape);
  canvas.setAttribute("aria-label", `The chosen image, ${state.image.name}`);
  const [, h, w] = decoded.shape;
  const fits = model && model.input_shape[1] === h && model.input_shape[2] === w;
  setText("input-note", `${state.image.name}: ${h}×${w}. ${fits ? "It fits the model." : model
    ? `The model takes ${model.input_shape[1]}×${model.input_shape[2]}: the service will refuse it (it never resizes).`
    : ""}`);
}

function certificationForm() {
  const model = selectedModel();
  if (!model) throw new Error("Choose a model.");
  if (!state.image) throw new Error("Choose an example or upload an image.");
  const form = new FormData();
  form.append("model", model.name);
  form.append("image", state.image.blob, state.image.name);
  const memory = $("memory").checked;
  if (model.kind === "selector") { /* it chooses σ itself */ }
  else if ($("sigma-search").checked) form.append("sigma_search", $("search-method").value);
  else if (numberOf("sigma") !== null) form.append("sigma", numberOf("sigma"));
  form.append("memory", String(memory));
  form.append("sampling", $("sampling").value);
  if ($("sampling").value === "adaptive" && numberOf("tolerance") !== null) form.append("tolerance", numberOf("tolerance"));
  if ($("sampling").value === "sequential") form.append("target_radius", numberOf("target-radius") ?? "");
  form.append("bound", $("bound").value);
  for (const id of ["n", "n0"]) if (numberOf(id) !== null) form.append(id, numberOf(id));
  form.append("alpha", memory ? $("alpha-level").value : numberOf("alpha") ?? "0.001");
  if (!memory && numberOf("seed") !== null) form.append("seed", numberOf("seed"));
  return form;
}

async function certify(event) {
  event.preventDefault();
  setText("certify-error", "");
  $("certificate").hidden = true;
  const button = $("certify-submit");
  button.disabled = true;
  try {
    const form = certificationForm();
    const job = await json("v1/certifications", { method: "POST", body: form });
    const model = selectedModel().name;
    rememberJob({ id: job.id, kind: "certification", model, created: Date.now() / 1000 });
    if (state.decoded) state.inputs.set(job.id, state.decoded);
    certPanel.watch(job.id);
  } catch (error) {
    showError("certify-error", error);
  } finally {
    button.disabled = false;
  }
}

// --- watching a job ---------------------------------------------------------------------------

class JobPanel {
  constructor(sectionId, kind, onEnd) {
    this.section = $(sectionId);
    this.kind = kind;
    this.onEnd = onEnd;
    this.status = this.section.querySelector(".job-status");
    this.bar = this.section.querySelector("progress");
    this.cancelButton = this.section.querySelector(".cancel");
    this.cancelButton.addEventListener("click", () => this.cancel());
    this.controller = null;
    this.id = null;
    this.spoken = "";
  }

  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  }

  async watch(id) {
    this.stop();
    const controller = new AbortController();
    this.controller = controller;
    this.id = id;
    this.section.hidden = false;
    this.section.querySelector("h3").textContent = `Job ${id}`;
    this.cancelButton.hidden = false;
    this.cancelButton.disabled = false;
    this.bar.removeAttribute("value"); // indeterminate until the worker reports
    this.say("queued: waiting for a worker");
    try {
      for (;;) {
        const job = await json(`v1/${this.kind}s/${id}?wait=${POLL_WAIT}`, { signal: controller.signal });
        if (controller.signal.aborted) return;
        this.show(job);
        if (TERMINAL.has(job.status)) {
          this.cancelButton.hidden = true;
          this.onEnd(job);
          return;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") return;
      this.cancelButton.hidden = true;
      this.say(`could not follow the job: ${error instanceof ApiError ? error.toString() : error.message}`);
    }
  }

  say(text) {
    if (text !== this.spoken) this.status.textContent = text;
    this.spoken = text;
  }

  show(job) {
    const p = job.progress;
    if (job.status === "succeeded") {
      this.bar.value = 1;
      this.say("succeeded");
    } else if (job.status === "failed" || job.status === "cancelled") {
      this.bar.value = 0;
      this.say(`${job.status}: ${job.error ? `${job.error.code}: ${job.error.message}` : ""}`);
    } else if (p && p.samples_total > 0) {
      const fraction = Math.min(1, p.samples_done / p.samples_total);
      this.bar.value = fraction;
      // Spoken in steps of 10 %, so that a screen reader is not flooded; the bar moves on.
      const unit = this.kind === "evaluation" ? "examples" : "samples";
      this.say(`${job.status}, stage ${p.stage}: ${Math.floor(fraction * 10) * 10} % `
        + `(${count(p.samples_done)} of ${count(p.samples_total)} ${unit})`);
      this.status.dataset.detail = `${p.samples_done}/${p.samples_total}`;
    } else {
      this.say(job.status === "queued" ? "queued: waiting for a worker" : `${job.status}`);
    }
  }

  async cancel() {
    if (!this.id) return;
    this.cancelButton.disabled = true;
    try {
      await call(`v1/${this.kind}s/${this.id}`, { method: "DELETE" });
      this.say("cancelling…");
    } catch (error) {
      this.say(`could not cancel: ${error instanceof ApiError ? error.toString() : error.message}`);
    }
  }
}

// --- the certificate ----------------------------------------------------------------------------

function renderCertificate(job) {
  const r = job.result;
  if (job.status !== "succeeded" || !r) return;
  const section = $("certificate");
  const list = $("cert-fields");
  list.replaceChildren();
  setText("cert-headline", r.abstained
    ? "Abstained: no class is certified. That is an answer, not an error."
    : `Class ${r.prediction} (“${r.label}”), certified ℓ2 radius ${floorTo(r.radius, 4)}`);
  if (r.abstained) addField(list, "Class", "none (abstained)", "cert-class");
  else addField(list, "Class", `${r.prediction} (label “${r.label}”)`, "cert-class");
  const radius = element("span");
  radius.append(element("span", floorTo(r.radius, 4), { id: "cert-radius" }),
    element("span", ` (rounded down; exactly ${r.radius})`, { class: "hint" }));
  addField(list, "Radius (ℓ2)", radius);
  addField(list, "σ", r.noise_sigma !== undefined && r.noise_sigma !== r.sigma
    ? `${r.sigma} (noise as drawn: ${r.noise_sigma})` : r.sigma, "cert-sigma");
  addField(list, "n (votes the bound used)", r.n_max && r.n_max !== r.n ? `${count(r.n)} of at most ${count(r.n_max)}`
    : count(r.n), "cert-n");
  addField(list, "n0 (selection)", count(r.n0));
  addField(list, "α", r.look_alpha ? `${r.alpha} (this look: ${r.look_alpha})` : r.alpha, "cert-alpha");
  addField(list, "Bound", r.bound);
  const sampling = [r.sampling];
  if (r.tolerance !== null && r.tolerance !== undefined) sampling.push(`tolerance ${r.tolerance}`);
  if (r.target_radius !== null && r.target_radius !== undefined) sampling.push(`target radius ${r.target_radius}`);
  addField(list, "Sampling", sampling.join(", "));
  if (r.search) addField(list, "σ search", `${r.search.method}: σ = ${r.search.sigma} from σ0 = ${r.search.sigma0}`);
  if (r.selector) {
    const sel = r.selector;
    addField(list, "σ selector", sel.sigma_index === null
      ? `the estimator (σ_e = ${sel.sigma_e}) could not choose among ${sel.sigmas.join(", ")}: abstained`
      : `chose σ = ${sel.sigmas[sel.sigma_index]} of ${sel.sigmas.join(", ")}, fixed within R_σ = `
        + `${floorTo(sel.radius_sigma, 4)} (α/2 = ${sel.alpha_sigma}); the class holds within R_c = `
        + `${sel.radius_class === null ? "none" : floorTo(sel.radius_class, 4)} (α/2 = ${sel.alpha_class})`,
    "cert-selector");
  }
  const m = r.memory || { used: false };
  addField(list, "Memory", m.used
    ? `${m.outcome}; root entry ${m.root} (job ${m.root_job})${m.radius_before !== null && m.radius_before !== undefined
      ? `; before the rule: class ${m.prediction_before}, radius ${floorTo(m.radius_before, 4)}` : ""}`
    : "not used", "cert-memory");
  addField(list, "Seed", r.seed === null || r.seed === undefined ? "hidden" : `${r.seed} (chosen by the ${r.seed_source})`);
  addField(list, "Model", `${r.model.name}, ${r.model.digest}`);
  addField(list, "Numeric mode, batch size", `${r.numeric_mode}, ${r.batch_size}`);
  addField(list, "Forward passes, time", `${count(r.samples)}, ${Number(r.seconds).toFixed(2)} s`);
  setText("cert-guarantee", r.guarantee ? r.guarantee.statement : "");

  const votes = $("cert-votes");
  votes.hidden = !(r.n_a !== null && r.n_a !== undefined && r.n > 0);
  if (!votes.hidden) {
    const bounds = [`lower bound on its probability ${floorTo(r.p_a_lower, 6)}`];
    if (r.p_b_upper !== null && r.p_b_upper !== undefined) bounds.push(`upper bound on every other class ${ceilTo(r.p_b_upper, 6)}`);
    setText("cert-votes-text", `${count(r.n_a)} of ${count(r.n)} noisy copies voted for class ${r.prediction}; ${bounds.join(", ")}.`);
    $("cert-votes-meter").value = r.n_a / r.n;
  }
  drawSamples(job);
  section.hidden = false;
}

function drawSamples(job) {
  const r = job.result;
  const input = state.inputs.get(job.id);
  const box = $("cert-samples");
  box.replaceChildren();
  $("cert-picture").hidden = !input;
  if (!input) return;
  const seed = parseInt(job.id.slice(0, 8), 16) >>> 0;
  const random = generator(seed);
  const tiles = [["the input", input.pixels]];
  const short = Number(r.sigma.toPrecision(4));
  const sigma = short === r.sigma ? `σ = ${r.sigma}` : `σ ≈ ${short}`; // a label; the noise uses σ itself
  for (let i = 1; i <= 4; i++) tiles.push([`noise ${sigma}, #${i}`, noisy(input.pixels, r.sigma, random)]);
  // The ball is open: the change shown is just inside it.
  if (r.radius > 0) {
    tiles.push([`a change of ℓ2 norm just under ${floorTo(r.radius, 4)}`, shifted(input.pixels, 0.999 * r.radius, random)]);
  }
  for (const [label, pixels] of tiles) {
    const tile = element("div", null, { class: "sample" });
    const canvas = element("canvas", null, { role: "img", "aria-label": label });
    draw(canvas, pixels, input.shape, 96);
    tile.append(canvas, element("span", label));
    box.append(tile);
  }
  const d = input.pixels.length;
  const perPixel = r.radius / Math.sqrt(d);
  setText("cert-caption", `Illustration, drawn in this browser (seed 0x${seed.toString(16)}), not the job's own samples; `
    + "values are clipped to [0, 1] for display only. The smoothed classifier votes over noisy copies like these. "
    + (r.radius > 0
      ? `The certificate says that no change of ℓ2 norm below ${floorTo(r.radius, 4)}, in any direction (the last `
        + "picture is one), changes the smoothed classifier's answer, unless the sampling misled the bound "
        + `(probability at most α): over ${d} values that is ${floorTo(perPixel, 3)} per value (root mean square), `
        + `against noise of ${sigma} per value.`
      : "It abstained or certified radius 0: no change is covered."));
}

// --- my jobs -------------------------------------------------------------------------------------

async function renderJobs() {
  setText("jobs-error", "");
  const list = jobs();
  $("jobs-empty").hidden = list.length > 0;
  const body = $("jobs-table").querySelector("tbody");
  body.replaceChildren(...list.map((job) => {
    const row = element("tr", null, { "data-job": job.id });
    const id = element("td");
    id.append(element("code", job.id));
    const status = element("td", "…", { class: "job-state" });
    const open = element("td");
    const button = element("button", "Open", { type: "button", "aria-label": `Open job ${job.id}` });
    button.addEventListener("click", () => openJob(job));
    open.append(button);
    row.append(id, element("td", job.kind), element("td", job.model),
      element("td", new Date(job.created * 1000).toLocaleTimeString()), status, open);
    return row;
  }));
  await Promise.all(list.map(async (job) => {
    const cell = body.querySelector(`tr[data-job="${job.id}"] .job-state`);
    try {
      const found = await json(`v1/${job.kind}s/${job.id}`);
      cell.textContent = found.result && job.kind === "certification" && found.status === "succeeded"
        ? found.result.abstained ? "succeeded: abstained" : `succeeded: class ${found.result.prediction}, radius ${floorTo(found.result.radius, 4)}`
        : found.status;
    } catch (error) {
      cell.textContent = error instanceof ApiError && error.status === 404 ? "expired" : "unknown";
    }
  }));
}

function openJob(job) {
  if (job.kind === "evaluation") {
    showView("evaluate");
    $("eval-result").hidden = true;
    evalPanel.watch(job.id);
  } else {
    showView("certify");
    $("certificate").hidden = true;
    certPanel.watch(job.id);
  }
}

// --- evaluations ----------------------------------------------------------------------------------

function evalModelChanged() {
  const model = selectedModel("eval-model");
  if (model) $("eval-sigma").value = model.sigma.default;
}

async function evaluate(event) {
  event.preventDefault();
  setText("evaluate-error", "");
  $("eval-result").hidden = true;
  const button = $("evaluate-submit");
  button.disabled = true;
  try {
    const model = selectedModel("eval-model");
    if (!model) throw new Error("Choose a model.");
    const form = new FormData();
    form.append("model", model.name);
    if ($("eval-builtin").checked) {
      const blob = await (await call("console/examples/digits.npz", { key: "" })).blob();
      form.append("dataset", blob, "digits.npz");
    } else if ($("eval-file").files.length) {
      form.append("dataset", $("eval-file").files[0], $("eval-file").files[0].name);
    } else {
      throw new Error("Choose a data set file, or the example digits.");
    }
    for (const [id, field] of [["eval-sigma", "sigma"], ["eval-n", "n"], ["eval-alpha", "alpha"],
      ["eval-every", "every"], ["eval-limit", "limit"]]) {
      if (numberOf(id) !== null) form.append(field, numberOf(id));
    }
    const job = await json("v1/evaluations", { method: "POST", body: form });
    rememberJob({ id: job.id, kind: "evaluation", model: model.name, created: Date.now() / 1000 });
    evalPanel.watch(job.id);
  } catch (error) {
    showError("evaluate-error", error);
  } finally {
    button.disabled = false;
  }
}

const percent = (fraction) => `${floorTo(100 * fraction, 1)} %`;

async function renderEvaluation(job) {
  const s = job.result;
  if (job.status !== "succeeded" || !s) return;
  const list = $("eval-fields");
  list.replaceChildren();
  addField(list, "Examples certified", count(s.count), "eval-count");
  addField(list, "Clean accuracy (certified at radius 0)", percent(s.clean_accuracy), "eval-clean");
  addField(list, "Average certified radius", floorTo(s.acr, 4), "eval-acr");
  addField(list, "Abstentions", percent(s.abstention_rate));
  if (s.sigma) addField(list, "σ", s.sigma.min === s.sigma.max ? s.sigma.min : `${s.sigma.min} to ${s.sigma.max}`);
  const body = $("eval-table").querySelector("tbody");
  body.replaceChildren(...(s.certified_accuracy || []).map((point) => {
    const row = element("tr");
    row.append(element("td", point.radius), element("td", percent(point.accuracy)), element("td", point.count));
    return row;
  }));
  $("eval-result").hidden = false;
  const image = $("eval-curve");
  image.hidden = true;
  try {
    const blob = await (await call(`v1/evaluations/${job.id}/curve.png`)).blob();
    if (state.curveUrl) URL.revokeObjectURL(state.curveUrl);
    state.curveUrl = URL.createObjectURL(blob);
    image.alt = `Certified accuracy against ℓ2 radius for evaluation ${job.id}: ${percent(s.clean_accuracy)} at radius 0, `
      + `average certified radius ${floorTo(s.acr, 4)}.`;
    image.src = state.curveUrl;
    image.hidden = false;
  } catch (error) {
    showError("evaluate-error", error);
  }
}

// --- administration ----------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  setText("admin-error", "");
  setText("admin-status", "");
  const file = $("upload-bundle").files[0];
  if (!file) {
    setText("admin-error", "Choose a bundle (.zip).");
    return;
  }
  const form = new FormData();
  form.append("bundle", file, file.name);
  try {
    const model = await json("v1/models", { method: "POST", body: form });
    setText("admin-status", `Uploaded ${model.name} (${model.digest}).`);
    $("upload-bundle").value = "";
    await refreshModels();
  } catch (error) {
    showError("admin-error", error);
  }
}

async function remove(event) {
  event.preventDefault();
  setText("admin-error", "");
  setText("admin-status", "");
  const name = $("delete-model").value;
  if (!name) return;
  if (!$("delete-confirm").checked) {
    setText("admin-error", `Tick the box to confirm that ${name} is to be deleted.`);
    $("delete-confirm").focus();
    return;
  }
  try {
    const model = await json(`v1/models/${encodeURIComponent(name)}`, { method: "DELETE" });
    setText("admin-status", `Deleted ${model.name} (${model.digest}).`);
    $("delete-confirm").checked = false;
    await refreshModels();
  } catch (error) {
    showError("admin-error", error);
  }
}

// --- wiring ------------------------------------------------------------------------------------------

const certPanel = new JobPanel("cert-job", "certification", renderCertificate);
const evalPanel = new JobPanel("eval-job", "evaluation", renderEvaluation);

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", leave);
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  $("cert-model").addEventListener("change", modelChanged);
  $("eval-model").addEventListener("change", evalModelChanged);
  for (const id of ["src-example", "src-upload"]) $(id).addEventListener("change", chooseImage);
  $("example").addEventListener("change", () => {
    $("src-example").checked = true;
    chooseImage();
  });
  $("upload").addEventListener("change", () => {
    $("src-upload").checked = true;
    chooseImage();
  });
  $("eval-file").addEventListener("change", () => {
    $("eval-upload").checked = true;
  });
  for (const id of ["sigma-fixed", "sigma-search", "sampling"]) $(id).addEventListener("change", formChanged);
  $("memory").addEventListener("change", () => {
    state.memoryTouched = true;
    formChanged();
  });
  $("certify-form").addEventListener("submit", certify);
  $("evaluate-form").addEventListener("submit", evaluate);
  $("jobs-refresh").addEventListener("click", renderJobs);
  $("models-refresh").addEventListener("click", refreshModels);
  $("upload-form").addEventListener("submit", upload);
  $("delete-form").addEventListener("submit", remove);
}

async function start() {
  wire();
  const key = getKey();
  try {
    await enter(key);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      setKey("");
      showSignIn(key ? `The saved key was refused: ${error.toString()}` : "");
    } else {
      $("who").textContent = `The API did not answer: ${error instanceof ApiError ? error.toString() : error.message}`;
    }
  }
}

start();
