// The console: sign in with an admin token, then the panels. Every number on the page comes
// from the daemon's authenticated endpoints; this file only wires the panels together.

import { AlertsPanel } from "./alerts.js";
import { forgetToken, getJson, setToken, showError, token } from "./api.js";
import { LettersPanel } from "./letters.js";
import { SearchPanel } from "./search.js";
import { TailPanel } from "./tail.js";
import { TargetsPanel } from "./targets.js";

const $ = (selector) => document.querySelector(selector);

const panels = {
  targets: new TargetsPanel($("#targets")),
  tail: new TailPanel($("#tail")),
  search: new SearchPanel($("#search")),
  letters: new LettersPanel($("#letters")),
  alerts: new AlertsPanel($("#alerts")),
};
panels.targets.onStatus((status) => panels.search.setTargets(status));

function open(name) {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.panel === name);
  }
  for (const section of document.querySelectorAll("section.panel")) {
    section.hidden = section.id !== name;
  }
  if (name === "letters") panels.letters.refresh();
  if (name === "tail") loadViews();
  if (name === "alerts") panels.alerts.start();
  else panels.alerts.stop();
}

// The saved views, for the tail's list (read again each time the tail panel opens: views
// change through the API and on reload).
async function loadViews() {
  try {
    panels.tail.setViews((await getJson("/api/v2/views")).views ?? []);
  } catch (error) {
    panels.tail.setViews([]);
    showError($("#tail-error"), error);
  }
}

function signedIn(status) {
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `event-router ${status.version}`;
  open("targets");
  panels.targets.start();
  loadViews();
}

function signedOut(error) {
  panels.targets.stop();
  panels.tail.stop();
  panels.alerts.stop();
  forgetToken();
  $("#login").hidden = false;
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  for (const section of document.querySelectorAll("section.panel")) section.hidden = true;
  showError($("#login-error"), error ?? null);
}

// The token is tried on /v1/status before anything is shown: a wrong one shows the daemon's
// refusal, and no panel.
async function signIn() {
  try {
    signedIn(await getJson("/v1/status"));
  } catch (error) {
    signedOut(error);
  }
}

$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setToken($("#token").value.trim());
  $("#token").value = "";
  signIn();
});
$("#logout").addEventListener("click", () => signedOut(null));
for (const button of document.querySelectorAll("#tabs button")) {
  button.addEventListener("click", () => open(button.dataset.panel));
}

if (token() !== null) signIn();
