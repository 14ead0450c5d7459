// The HTTP API as the console calls it: relative URLs (the console is served by the API
// itself), the key as `Authorization: Bearer`, and every error as an ApiError carrying the
// API's own `{"error": {"code", "message"}}`. The key lives in this tab's sessionStorage only:
// never in a URL, a cookie or localStorage.

const KEY = "smoothcert.key";
const JOBS = "smoothcert.jobs";
const MAX_JOBS = 50;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  toString() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

/** Forget the key and the jobs it submitted from this tab. */
export function signOut() {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(JOBS);
}

async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "the request failed";
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error) {
      code = String(body.error.code);
      message = String(body.error.message);
    } else if (body && typeof body.error === "string") {
      message = body.error;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

/** fetch(path) with the key; the Response when ok, else throws an ApiError. */
export async function call(path, { method = "GET", body = undefined, key = getKey(), signal } = {}) {
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, credentials: "omit", cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", `the API did not answer (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** JSON with every `seed` as a string: seeds are 63-bit integers, past what a JavaScript
 * number holds exactly, and a seed shown must be the seed used. */
export function parseJson(text) {
  return JSON.parse(text.replace(/("seed"\s*:\s*)(-?\d+)(?=\s*[,}])/g, '$1"$2"'));
}

export async function json(path, options) {
  return parseJson(await (await call(path, options)).text());
}

/** The jobs submitted from this tab, most recent first (the API has no route that lists a key's jobs). */
export function jobs() {
  try {
    const list = JSON.parse(sessionStorage.getItem(JOBS) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

export function rememberJob(job) {
  const list = [job, ...jobs().filter((j) => j.id !== job.id)].slice(0, MAX_JOBS);
  sessionStorage.setItem(JOBS, JSON.stringify(list));
}
