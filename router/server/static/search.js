// Search of a file target's archive (GET /v1/search), a page at a time: the daemon reads at
// most a bounded number of lines per page and hands back a cursor for the next one.

import { ApiError, count, getJson, showError } from "./api.js";
import { eventRow } from "./events.js";

export class SearchPanel {
  constructor(root) {
    this.root = root;
    this.form = root.querySelector("#search-form");
    this.target = root.querySelector("#search-target");
    this.query = root.querySelector("#search-query");
    this.since = root.querySelector("#search-since");
    this.until = root.querySelector("#search-until");
    this.body = root.querySelector("#search-table tbody");
    this.statusLine = root.querySelector("#search-status");
    this.error = root.querySelector("#search-error");
    this.detail = root.querySelector("#search-detail");
    this.next = root.querySelector("#search-next");
    this.first = root.querySelector("#search-first");
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.search(null);
    });
    this.next.addEventListener("click", () => this.search(this.cursor));
    this.first.addEventListener("click", () => this.search(null));
    this.asked = null;
  }

  // The file targets, from a /v1/status sample (only they keep a searchable archive).
  setTargets(status) {
    const ids = Object.entries(status.targets ?? {})
      .filter(([, t]) => t.target_type === "file")
      .map(([id]) => id);
    const have = [...this.target.options].map((o) => o.value);
    if (have.join("\n") === ids.join("\n")) return;
    const chosen = this.target.value;
    this.target.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(chosen)) this.target.value = chosen;
  }

  async search(cursor) {
    if (cursor === null) {
      this.asked = {
        target: this.target.value,
        query: this.query.value,
        since: this.since.value.trim(),
        until: this.until.value.trim(),
      };
      this.page = 0;
    }
    showError(this.error, null);
    this.next.disabled = this.first.disabled = true;
    this.statusLine.textContent = "searching...";
    try {
      const found = await getJson("/v1/search", { params: { ...this.asked, cursor } });
      this.page += 1;
      this.cursor = found.next;
      this.body.replaceChildren(...found.events.map((event) => eventRow(event, this.detail)));
      this.detail.hidden = true;
      const end = found.next ? "more follow" : "end of the archive";
      const bad = found.not_json ? `, ${count(found.not_json)} lines not JSON` : "";
      this.statusLine.textContent = `page ${this.page} of ${this.asked.target}: ${count(found.events.length)} events, ${count(found.scanned_lines)} lines read${bad}; ${end}`;
      this.next.disabled = !found.next;
      this.first.disabled = this.page <= 1;
    } catch (error) {
      this.statusLine.textContent = "";
      showError(this.error, error.code === "bad_query" ? new ApiError(400, "bad_query", `bad query at column ${error.body.column}: ${error.message}`) : error);
    }
  }
}
