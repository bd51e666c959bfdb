// Dead letters: per target and reason (GET /v1/deadletters), a target's letters a page at a
// time (GET /v1/deadletters/{target}), one shown in full, and a redrive
// (POST /v1/deadletters/{target}/redrive) whose streamed progress fills a bar.

import { call, cell, count, getJson, lines, showError } from "./api.js";
import { showDetail } from "./events.js";

const PAGE = 50;

export class LettersPanel {
  constructor(root) {
    this.root = root;
    this.body = root.querySelector("#letters-table tbody");
    this.error = root.querySelector("#letters-error");
    this.list = root.querySelector("#letter-list tbody");
    this.heading = root.querySelector("#letters-heading");
    this.more = root.querySelector("#letters-more");
    this.detail = root.querySelector("#letter-detail");
    this.redriveBox = root.querySelector("#redrive");
    this.redriveLabel = root.querySelector("#redrive-label");
    this.progress = root.querySelector("#redrive-progress");
    this.redriveStatus = root.querySelector("#redrive-status");
    root.querySelector("#letters-refresh").addEventListener("click", () => this.refresh());
    this.more.addEventListener("click", () => this.show(this.shown.target, this.shown.reason, this.shown.next));
    this.shown = null;
  }

  async refresh() {
    try {
      const summary = await getJson("/v1/deadletters");
      showError(this.error, null);
      this.render(summary.targets);
    } catch (error) {
      showError(this.error, error);
    }
  }

  render(targets) {
    const rows = Object.entries(targets).map(([id, t]) => {
      const tr = document.createElement("tr");
      tr.dataset.target = id;
      cell(tr, id, "name");
      cell(tr, count(t.letters), "num letters");
      const reasons = cell(tr, "");
      reasons.textContent = "";
      for (const [reason, n] of Object.entries(t.reasons)) {
        const chip = document.createElement("button");
        chip.type = "button";
        chip.className = "chip";
        chip.dataset.reason = reason;
        chip.textContent = `${reason}: ${count(n)}`;
        chip.addEventListener("click", () => this.show(id, reason, 0));
        reasons.append(chip, " ");
      }
      cell(tr, t.first);
      cell(tr, t.last);
      const actions = cell(tr, "");
      actions.textContent = "";
      const show = document.createElement("button");
      show.type = "button";
      show.textContent = "Show";
      show.addEventListener("click", () => this.show(id, "", 0));
      const redrive = document.createElement("button");
      redrive.type = "button";
      redrive.className = "redrive";
      redrive.textContent = "Redrive";
      redrive.disabled = t.letters === 0;
      redrive.addEventListener("click", () => this.redrive(id, this.shown?.target === id ? this.shown.reason : ""));
      actions.append(show, " ", redrive);
      return tr;
    });
    this.body.replaceChildren(...rows);
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, "no dead letters").colSpan = 6;
      this.body.append(tr);
    }
  }

  async show(target, reason, offset) {
    try {
      const found = await getJson(`/v1/deadletters/${encodeURIComponent(target)}`, {
        params: { reason, offset, limit: PAGE },
      });
      showError(this.error, null);
      this.shown = { target, reason, next: found.next_offset };
      const rows = found.letters.map((letter) => this.letterRow(letter));
      if (offset === 0) {
        this.list.replaceChildren(...rows);
        this.detail.hidden = true;
      } else {
        this.list.append(...rows);
      }
      const which = reason ? ` (${reason})` : "";
      this.heading.textContent = `${target}${which}: ${count(found.total)} letters`;
      this.more.hidden = found.next_offset === null;
    } catch (error) {
      showError(this.error, error);
    }
  }

  letterRow(letter) {
    const tr = document.createElement("tr");
    tr.className = "letter";
    const event = letter.event ?? {};
    cell(tr, letter.last_attempt_at ?? letter.received_at);
    cell(tr, letter.reason);
    cell(tr, letter.status);
    cell(tr, event.id);
    cell(tr, event.action);
    cell(tr, letter.message);
    tr.addEventListener("click", () => showDetail(this.detail, letter));
    return tr;
  }

  // Redrive a target's letters (of the reason shown, if one is), drawing the progress the
  // daemon streams: {"done": n, "total": m} lines.
  async redrive(target, reason) {
    this.redriveBox.hidden = false;
    this.redriveLabel.textContent = `redriving ${target}${reason ? ` (${reason})` : ""}`;
    this.progress.max = 1;
    this.progress.value = 0;
    this.redriveStatus.textContent = "";
    let done = 0;
    let total = 0;
    let skipped = {};
    try {
      const response = await call(`/v1/deadletters/${encodeURIComponent(target)}/redrive`, {
        method: "POST",
        params: { reason },
      });
      for await (const line of lines(response)) {
        const step = JSON.parse(line);
        ({ done, total } = step);
        skipped = step.skipped ?? skipped;
        this.progress.max = Math.max(total, 1);
        this.progress.value = total ? done : 1;
        this.redriveStatus.textContent = `${count(done)} / ${count(total)}`;
      }
      const left = Object.entries(skipped).map(([why, n]) => `${count(n)} left in the file (${why})`);
      this.redriveStatus.textContent = done < total
        ? `stopped after ${count(done)} of ${count(total)}`
        : [`redriven: ${count(done)} of ${count(total)} back on the journal`, ...left].join("; ");
    } catch (error) {
      this.redriveStatus.textContent = `redrive refused: ${error.message}`;
    }
    await this.refresh();
    if (this.shown?.target === target) await this.show(target, this.shown.reason, 0);
  }
}
