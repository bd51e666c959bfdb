// The console: sign in with an admin token, then the panels. Every number on the page comes
// from the daemon's authenticated endpoints; this file only wires the panels together.

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
}

function signedIn(status) {
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `event-router ${status.version}`;
  open("targets");
  panels.targets.start();
}

function signedOut(error) {
  panels.targets.stop();
  panels.tail.stop();
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
