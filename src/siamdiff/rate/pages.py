"""The page templates and script (Jinja autoescapes every value, so names cannot inject HTML)."""

from __future__ import annotations

MIN_VIEW_MS = 400  # how long an image is shown before a score for it is taken

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Realism rating</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 760px; margin: 2em auto; color: #222; }
.bar { background: #e5e5e5; height: 10px; border-radius: 5px; margin: .3em 0 1em; }
.bar > div { background: #3b7dd8; height: 10px; border-radius: 5px; }
.stage { text-align: center; }
/* One display size for every image, so size gives no hint of the source. */
.stage img { width: 512px; max-width: 100%; border: 1px solid #ccc; }
.scores button { font-size: 1.3em; width: 3.2em; margin: .2em; }
.guess label { margin: 0 1em; }
.error { color: #a00; }
.hint { color: #666; font-size: .9em; }
</style></head><body>
{% block body %}{% endblock %}
</body></html>
"""

START = """{% extends "layout.html" %}{% block body %}
<h1>Realism rating</h1>
<p>You will see {{ total }} images, one at a time. Rate how realistic each looks,
from 1 (clearly artificial) to 5 (indistinguishable from a real image).</p>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="/start">
  <h2>New rater</h2>
  <label>Your name or initials <input name="name" id="name" maxlength="80" required></label>
  <button type="submit" id="begin">Begin</button>
</form>
<form method="post" action="/resume">
  <h2>Resume</h2>
  <label>Your rater code <input name="code" id="code" maxlength="16" required></label>
  <button type="submit" id="resume">Resume</button>
</form>
<script src="/static/rate.js"></script>
{% endblock %}
"""

RATE = """{% extends "layout.html" %}{% block body %}
<p>Rater <strong id="rater">{{ rater.name }}</strong> &middot; code
<code id="rater-code">{{ rater.code }}</code> (note it to resume later)</p>
<div>Image {{ position + 1 }} of {{ total }}</div>
<div class="bar"><div id="progress" style="width: {{ percent }}%"></div></div>
<div class="stage">
  <img id="image" src="/image/{{ image }}" alt="image to rate">
  {% if overlay %}<p><button type="button" id="toggle-overlay"
    data-plain="/image/{{ image }}" data-overlay="/image/{{ image }}?overlay=1">
    Show / hide mask outline (m)</button></p>{% endif %}
</div>
<form method="post" action="/rate/{{ rater.code }}" id="answer">
  <input type="hidden" name="position" value="{{ position }}">
  <input type="hidden" name="token" value="{{ token }}">
  <p class="guess">Real or synthetic? (optional)
    <label><input type="radio" name="guess" value="real" id="guess-real"> real (r)</label>
    <label><input type="radio" name="guess" value="synthetic" id="guess-synthetic">
      synthetic (s)</label></p>
  <p class="scores">Realism:
  {% for s in range(1, 6) %}<button type="submit" name="score" value="{{ s }}"
    id="score-{{ s }}">{{ s }}</button>{% endfor %}</p>
  <p class="hint">Keys: 1&ndash;5 score, r / s guess{% if overlay %}, m mask{% endif %}.
  Every answer is saved at once; you may close the page and resume with your code.</p>
</form>
<script src="/static/rate.js"></script>
{% endblock %}
"""

DONE = """{% extends "layout.html" %}{% block body %}
<h1 id="done">Thank you, {{ rater.name }}</h1>
<p>All {{ total }} images are rated. You may close this page.</p>
{% endblock %}
"""

ERROR = """{% extends "layout.html" %}{% block body %}
<h1>Error {{ status }}</h1><p class="error" id="error">{{ message }}</p>
<p><a href="/">Back to the start page</a></p>
{% endblock %}
"""

SCRIPT = """"use strict";
(function () {
  // One submission per page: a double click must not enrol a rater twice.
  for (const form of document.forms) {
    let sent = false;
    form.addEventListener("submit", function (event) {
      if (sent) { event.preventDefault(); }
      sent = true;
    });
  }
  const form = document.getElementById("answer");
  const image = document.getElementById("image");
  if (!form) { return; }
  // A score counts only once the image has been on screen a moment: a key pressed twice,
  // or held, would otherwise answer the next image before the rater saw it.
  let readyAt = Infinity;
  function ready() {
    readyAt = performance.now() + MIN_VIEW_MS;
    setTimeout(function () { form.dataset.ready = "1"; }, MIN_VIEW_MS);
  }
  if (image.complete) { ready(); } else {
    image.addEventListener("load", ready, {once: true});
    image.addEventListener("error", ready, {once: true});
  }
  form.addEventListener("submit", function (event) {
    if (performance.now() < readyAt) { event.preventDefault(); event.stopImmediatePropagation(); }
  }, true);
  const toggle = document.getElementById("toggle-overlay");
  function flipOverlay() {
    const showing = image.getAttribute("src") === toggle.dataset.overlay;
    image.setAttribute("src", showing ? toggle.dataset.plain : toggle.dataset.overlay);
  }
  if (toggle) { toggle.addEventListener("click", flipOverlay); }
  form.addEventListener("keydown", function (event) {
    // Enter on a guess would submit the form's first button, score 1.
    if (event.key === "Enter" && event.target.type === "radio") { event.preventDefault(); }
  });
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.altKey || event.metaKey || event.repeat) { return; }
    if (event.key >= "1" && event.key <= "5") {
      document.getElementById("score-" + event.key).click();
    } else if (event.key === "r" || event.key === "s") {
      document.getElementById(event.key === "r" ? "guess-real" : "guess-synthetic").checked = true;
    } else if (event.key === "m" && toggle) {
      flipOverlay();
    }
  });
})();
""".replace("MIN_VIEW_MS", str(MIN_VIEW_MS))

# ".html" names: Flask turns autoescaping on by file extension.
TEMPLATES = {
    "layout.html": LAYOUT,
    "start.html": START,
    "rate.html": RATE,
    "done.html": DONE,
    "error.html": ERROR,
}
