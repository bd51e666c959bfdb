// Targets: /v1/status sampled every POLL_MS while the tab is visible (one request at a time,
// never more often), the books per target, and delivered/s over the last SAMPLES samples.

import { call, cell, count, getJson, showError } from "./api.js";
import { sparkline } from "./sparkline.js";

export const POLL_MS = 2000;
const SAMPLES = 60; // two minutes of delivered/s per target

export class TargetsPanel {
  constructor(root) {
    this.root = root;
    this.body = root.querySelector("#targets-table tbody");
    this.error = root.querySelector("#targets-error");
    this.sampled = root.querySelector("#targets-sampled");
    this.ingestLine = root.querySelector("#ingest-line");
    this.history = new Map(); // target id -> {at, delivered, rates: []}
    this.lastIngest = null;
    this.status = null;
    this.timer = null;
    this.busy = false;
    this.listeners = [];
    this.notes = new Map(); // target id -> what its last validation said
  }

  onStatus(listener) {
    this.listeners.push(listener);
  }

  start() {
    if (this.timer === null) {
      this.timer = setInterval(() => this.poll(), POLL_MS);
      this.poll();
    }
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    if (this.busy || document.visibilityState === "hidden") return;
    this.busy = true;
    try {
      const status = await getJson("/v1/status");
      this.status = status;
      showError(this.error, null);
      this.sample(status, performance.now() / 1000);
      this.render(status);
      for (const listener of this.listeners) listener(status);
    } catch (error) {
      showError(this.error, error);
    } finally {
      this.busy = false;
    }
  }

  // One more sample: delivered/s per target and accepted/s since the previous one.
  sample(status, now) {
    for (const [id, row] of Object.entries(status.targets ?? {})) {
      const seen = this.history.get(id) ?? { at: now, delivered: row.delivered, rates: [] };
      if (now > seen.at) {
        const rate = Math.max(0, (row.delivered - seen.delivered) / (now - seen.at));
        seen.rates = [...seen.rates, rate].slice(-SAMPLES);
      }
      seen.at = now;
      seen.delivered = row.delivered;
      this.history.set(id, seen);
    }
    const accepted = status.ingest?.accepted ?? 0;
    if (this.lastIngest && now > this.lastIngest.at) {
      this.ingestRate = (accepted - this.lastIngest.accepted) / (now - this.lastIngest.at);
    }
    this.lastIngest = { at: now, accepted };
  }

  render(status) {
    const rows = [];
    for (const [id, target] of Object.entries(status.targets ?? {})) {
      const rates = this.history.get(id)?.rates ?? [];
      const tr = document.createElement("tr");
      tr.dataset.target = id;
      cell(tr, id, "name");
      cell(tr, target.target_type);
      const write = target.write_status ?? {};
      cell(tr, target.worker_failing ? `${write.status} (worker failing)` : write.status, `status-${write.status}`);
      cell(tr, count(target.pending), "backlog num");
      cell(tr, count(target.received), "num");
      cell(tr, count(target.delivered), "delivered num");
      cell(tr, count(target.dead_lettered), "dead num");
      cell(tr, count(target.lost), "num");
      const failure = write.last_failure ? `${write.last_failure}: ${write.reason_for_last_failure ?? ""}` : "";
      const note = this.notes.get(id) ?? failure;
      cell(tr, note, note ? "failure" : "muted");
      const spark = cell(tr, rates.length ? `${rates.at(-1).toFixed(1)}` : "", "rate num");
      spark.prepend(sparkline(rates.length ? rates : [0]));
      const actions = cell(tr, "");
      actions.textContent = "";
      const validate = document.createElement("button");
      validate.type = "button";
      validate.textContent = "Validate";
      validate.className = "validate";
      validate.addEventListener("click", () => this.validate(id, validate));
      actions.append(validate);
      rows.push(tr);
    }
    this.body.replaceChildren(...rows);
    const ingest = status.ingest ?? {};
    const rate = this.ingestRate === undefined ? "" : `, ${this.ingestRate.toFixed(0)}/s now`;
    this.ingestLine.textContent = `ingest: ${count(ingest.accepted)} accepted${rate}, ${count(ingest.rejected)} rejected, ${count(ingest.unrouted)} unrouted; journal ${status.journal?.healthy ? "healthy" : "UNHEALTHY"}`;
    this.sampled.textContent = `sampled every ${POLL_MS / 1000} s, ${new Date().toLocaleTimeString()}`;
  }

  // POST /api/v2/targets/{id}/validate: a test write through the target; its write_status.
  async validate(id, button) {
    button.disabled = true;
    this.notes.set(id, "validating...");
    try {
      const response = await call(`/api/v2/targets/${encodeURIComponent(id)}/validate`, { method: "POST" });
      const model = await response.json();
      const write = model.write_status ?? {};
      this.notes.set(id, write.status === "failed" ? `validate failed: ${write.reason_for_last_failure ?? ""}` : `validated: ${write.status ?? "success"}`);
    } catch (error) {
      this.notes.set(id, `validate failed: ${error.message}`);
    } finally {
      button.disabled = false;
      if (this.status) this.render(this.status);
    }
  }
}
