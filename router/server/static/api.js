// The daemon's API as the console calls it: the admin token from sessionStorage as a bearer
// header (never in a URL), JSON answers, errors as exceptions that carry the daemon's message.

const TOKEN_KEY = "event-router.admin-token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

function headers(extra) {
  const found = token();
  const all = { Accept: "application/json", ...extra };
  if (found) all.Authorization = `Bearer ${found}`;
  return all;
}

// The error of a refused call, in either of the daemon's shapes: {"error": {code, message}}
// or atracker's {"errors": [{code, message}]}.
async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body?.error ?? body?.errors?.[0] ?? {};
  const message = error.message ?? `${response.status} ${response.statusText}`;
  return new ApiError(response.status, error.code ?? "http_error", message, error);
}

// `fetch` with the admin token; a refusal becomes an ApiError. `signal` aborts.
export async function call(path, { method = "GET", params, signal, body } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [key, value] of Object.entries(params ?? {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  const init = { method, headers: headers(), signal, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(url, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJson(path, options) {
  const response = await call(path, options);
  return response.status === 204 ? null : response.json();
}

// Lines of a streamed answer (NDJSON), as they arrive.
export async function* lines(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let rest = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    rest += value;
    const parts = rest.split("\n");
    rest = parts.pop();
    for (const line of parts) if (line.trim()) yield line;
  }
  if (rest.trim()) yield rest;
}

// Text helpers: everything the console shows goes through textContent, never HTML.
export function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null || text === "" ? "-" : String(text);
  if (className) td.className = className;
  row.append(td);
  return td;
}

export function showError(element, error) {
  element.textContent = error ? `${error.status ? `${error.status} ` : ""}${error.message}` : "";
}

export function count(n) {
  return Number(n ?? 0).toLocaleString("en-US");
}
