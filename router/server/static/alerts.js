// Alerts (GET /api/v2/alerts, when the daemon has them): per alert its condition, the query it
// runs, state, matches in the current window against its threshold, last firing and firings.
// Read every POLL_MS while the panel is open, one request at a time.

import { cell, count, getJson, showError } from "./api.js";

export const POLL_MS = 5000;

export class AlertsPanel {
  constructor(root) {
    this.root = root;
    this.body = root.querySelector("#alerts-table tbody");
    this.error = root.querySelector("#alerts-error");
    this.timer = null;
    this.busy = false;
  }

  start() {
    if (this.timer === null) {
      this.timer = setInterval(() => this.refresh(), POLL_MS);
      this.refresh();
    }
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async refresh() {
    if (this.busy) return;
    this.busy = true;
    try {
      const found = await getJson("/api/v2/alerts");
      showError(this.error, null);
      this.render(found.alerts ?? []);
    } catch (error) {
      showError(this.error, error);
    } finally {
      this.busy = false;
    }
  }

  render(alerts) {
    const rows = alerts.map((alert) => {
      const tr = document.createElement("tr");
      tr.dataset.alert = alert.name;
      cell(tr, alert.name, "name");
      cell(tr, alert.condition);
      cell(tr, alert.effective_query ?? alert.query ?? (alert.view ? `view ${alert.view}` : ""));
      cell(tr, alert.state, `state state-${alert.state}`);
      const threshold = alert.threshold ? ` / ${count(alert.threshold.count)}` : "";
      cell(tr, `${count(alert.matches_in_window)}${threshold}`, "num window-matches");
      cell(tr, alert.window_s ? `${alert.window_s} s` : "");
      cell(tr, alert.last_fired_at, "last-fired");
      cell(tr, count(alert.firings), "num firings");
      return tr;
    });
    this.body.replaceChildren(...rows);
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, "no alerts configured").colSpan = 8;
      this.body.append(tr);
    }
  }
}
