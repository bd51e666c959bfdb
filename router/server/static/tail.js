// The live tail: GET /v1/tail?query=... read with fetch (EventSource cannot send the bearer
// header), parsed as Server-Sent Events. The page samples: it keeps the newest MAX_ROWS
// events, parses only those, and redraws at most every RENDER_MS, whatever the rate; the
// daemon bounds what it queues for this page (1000 events) and drops the rest for it, telling
// it how many, so a busy daemon is never slowed by a browser.

import { ApiError, call, count, showError } from "./api.js";
import { eventRow } from "./events.js";

export const MAX_ROWS = 200;
const RENDER_MS = 250;

export class TailPanel {
  constructor(root) {
    this.root = root;
    this.form = root.querySelector("#tail-form");
    this.query = root.querySelector("#tail-query");
    this.view = root.querySelector("#tail-view");
    this.stopButton = root.querySelector("#tail-stop");
    this.startButton = root.querySelector("#tail-start");
    this.body = root.querySelector("#tail-table tbody");
    this.statusLine = root.querySelector("#tail-status");
    this.error = root.querySelector("#tail-error");
    this.detail = root.querySelector("#tail-detail");
    this.controller = null;
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.start();
    });
    this.stopButton.addEventListener("click", () => this.stop("stopped"));
    this.views = new Map();
    this.view.addEventListener("change", () => this.chooseView());
  }

  // Saved views (when the daemon has them): a view is sent by name (`?view=`, the daemon runs
  // its current query), and the query box, when filled, narrows it.
  setViews(views) {
    this.views = new Map(views.map((v) => [v.name, v.query]));
    const chosen = this.view.value;
    const options = [new Option("(no saved view)", "")];
    for (const name of this.views.keys()) options.push(new Option(name, name));
    this.view.replaceChildren(...options);
    if (this.views.has(chosen)) this.view.value = chosen;
    this.view.hidden = this.views.size === 0;
  }

  chooseView() {
    const query = this.views.get(this.view.value);
    this.query.placeholder = query === undefined ? "host:secrets-manager reason.reasonType:Unauthorized" : `narrow the view: ${query}`;
  }

  async start() {
    this.stop();
    const controller = new AbortController();
    this.controller = controller;
    this.body.replaceChildren();
    this.detail.hidden = true;
    showError(this.error, null);
    this.seen = 0;
    this.dropped = 0;
    this.fresh = [];
    this.started = performance.now();
    this.stopButton.disabled = false;
    this.statusLine.textContent = "connecting...";
    try {
      const response = await call("/v1/tail", {
        params: { query: this.query.value, view: this.view.value },
        signal: controller.signal,
      });
      this.timer = setInterval(() => this.render(), RENDER_MS);
      await this.read(response, controller);
      if (this.controller === controller) this.stop("the daemon ended the stream");
    } catch (error) {
      if (controller.signal.aborted) return;
      this.stop("not tailing");
      showError(this.error, error.code === "bad_query" ? new ApiError(400, "bad_query", `bad query at column ${error.body.column}: ${error.message}`) : error);
    }
  }

  async read(response, controller) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = "";
    while (this.controller === controller) {
      const { value, done } = await reader.read();
      if (done) return;
      rest += value;
      const messages = rest.split("\n\n");
      rest = messages.pop();
      for (const message of messages) this.take(message);
    }
  }

  // One SSE message: its data is kept only while it is among the newest MAX_ROWS.
  take(message) {
    let kind = "message";
    let data = "";
    for (const line of message.split("\n")) {
      if (line.startsWith("event: ")) kind = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (kind === "event") {
      this.seen += 1;
      this.fresh.push(data);
      if (this.fresh.length > MAX_ROWS) this.fresh.splice(0, this.fresh.length - MAX_ROWS);
    } else if (kind === "dropped") {
      this.dropped = JSON.parse(data).dropped;
    } else if (kind === "ready") {
      const query = JSON.parse(data).query;
      this.canonical = query;
      this.render();
    }
  }

  render() {
    const fresh = this.fresh;
    this.fresh = [];
    if (fresh.length) {
      const rows = fresh.reverse().map((data) => eventRow(JSON.parse(data), this.detail));
      this.body.prepend(...rows);
      while (this.body.rows.length > MAX_ROWS) this.body.lastElementChild.remove();
    }
    const seconds = (performance.now() - this.started) / 1000;
    const rate = seconds > 0 ? (this.seen / seconds).toFixed(1) : "0";
    const what = this.canonical ? `tailing ${this.canonical}` : "tailing every event";
    const dropped = this.dropped ? `; the daemon dropped ${count(this.dropped)} for this page (too many to show)` : "";
    this.statusLine.textContent = `${what}: ${count(this.seen)} events (${rate}/s), newest ${MAX_ROWS} shown${dropped}`;
  }

  stop(why) {
    if (this.controller) this.controller.abort();
    this.controller = null;
    clearInterval(this.timer);
    this.timer = null;
    this.stopButton.disabled = true;
    if (why) {
      if (this.fresh?.length) this.render();
      this.statusLine.textContent = `${why}. ${this.statusLine.textContent}`;
    }
  }
}
