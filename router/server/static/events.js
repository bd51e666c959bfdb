// One audit event as a table row (the columns `event-router query --format table` prints),
// and its full JSON below the table on a click. Text only: an event's values are whatever a
// producer sent, so nothing of it is ever parsed as HTML.

import { cell } from "./api.js";

export function host(event) {
  const crn = typeof event.logSourceCRN === "string" ? event.logSourceCRN.split(":") : [];
  return crn[4] ?? "";
}

export function eventRow(event, detail) {
  const row = document.createElement("tr");
  row.className = "event";
  cell(row, event.eventTime);
  cell(row, host(event));
  cell(row, event.action);
  cell(row, event.outcome, `outcome-${String(event.outcome ?? "")}`);
  const reason = event.reason ?? {};
  cell(row, [reason.reasonCode, reason.reasonType].filter((x) => x !== undefined).join(" "));
  cell(row, event.initiator?.name ?? event.initiator?.id);
  cell(row, event.target?.name ?? event.target?.id);
  row.dataset.id = String(event.id ?? "");
  row.addEventListener("click", () => showDetail(detail, event));
  return row;
}

export function showDetail(element, value) {
  element.textContent = JSON.stringify(value, null, 2);
  element.hidden = false;
}
