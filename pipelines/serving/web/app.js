// InstAlign page: read the chosen image as base64, POST /explain, draw what comes back.
"use strict";

const $ = (id) => document.getElementById(id);
let imageBase64 = null;  // the chosen image's encoded bytes, base64

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function bytesToBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

async function useImage(blob) {
  imageBase64 = bytesToBase64(await blob.arrayBuffer());
  $("preview").src = URL.createObjectURL(blob);
  $("preview").hidden = false;
  $("result").hidden = true;
  clearError();
}

function suggest(expressions) {
  const list = $("suggestions");
  list.replaceChildren(...expressions.map((e) => Object.assign(document.createElement("option"), { value: e })));
  $("text").setAttribute("list", "suggestions");
}

async function loadSamples() {
  const response = await fetch("samples");
  if (!response.ok) return;
  const data = await response.json();
  $("model-name").textContent = `Model: ${data.model}`;
  for (const s of data.samples) {
    const option = document.createElement("option");
    option.value = s.file;
    option.textContent = `${s.file} (${s.expressions[0]})`;
    option.dataset.expressions = JSON.stringify(s.expressions);
    $("sample").append(option);
  }
}

function render(answer) {
  const p = answer.prediction;
  const verdict = $("verdict");
  if (p.no_target) {
    verdict.textContent = `No target: nothing in the image matches (p_nt = ${p.no_target_prob.toFixed(3)})`;
    verdict.className = "no-target";
  } else {
    const n = p.instances.length;
    verdict.textContent = `Target found: ${n} instance${n === 1 ? "" : "s"} (p_nt = ${p.no_target_prob.toFixed(3)})`;
    verdict.className = "target";
  }
  $("overlay").src = `data:image/png;base64,${answer.overlay_png}`;
  const items = p.instances.map((inst, k) => {
    const li = document.createElement("li");
    li.className = "instance";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = answer.colours[k];
    const words = inst.words.map((w, j) => `${w} (${inst.word_weights[j].toFixed(2)})`).join(", ");
    li.append(swatch, `score ${inst.score.toFixed(3)} — words: ${words}`);
    return li;
  });
  $("instances").replaceChildren(...items);
  $("raw-json").textContent = JSON.stringify(p, null, 2);
  $("raw-json").hidden = !$("show-json").checked;
  $("result").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  clearError();
  if (!imageBase64) { showError("Choose an image first (upload one or pick a sample)."); return; }
  const text = $("text").value;
  if (!text.trim()) { showError("Type an expression describing what to segment."); return; }
  $("status").textContent = "Segmenting…";
  $("submit").disabled = true;
  try {
    const response = await fetch("explain", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: imageBase64, text }),
    });
    const body = await response.json().catch(() => ({ message: `HTTP ${response.status}` }));
    if (!response.ok) {
      $("result").hidden = true;
      showError(`The server refused this (HTTP ${response.status}): ${body.message}`);
      return;
    }
    render(body);
    $("status").textContent = "Done.";
  } catch (e) {
    showError(`The request failed: ${e}`);
  } finally {
    $("submit").disabled = false;
  }
}

$("image-file").addEventListener("change", async () => {
  const file = $("image-file").files[0];
  if (file) { $("sample").value = ""; await useImage(file); }
});
$("sample").addEventListener("change", async () => {
  const option = $("sample").selectedOptions[0];
  if (!option.value) return;
  $("image-file").value = "";
  const response = await fetch(`samples/${encodeURIComponent(option.value)}`);
  await useImage(await response.blob());
  const expressions = JSON.parse(option.dataset.expressions);
  suggest(expressions);
  if (!$("text").value) $("text").value = expressions[0];
});
$("show-json").addEventListener("change", () => { $("raw-json").hidden = !$("show-json").checked; });
$("query").addEventListener("submit", submit);
loadSamples();
