// The page: runs the scenario here, then once more in a Web Worker, and
// shows both results. `#status[data-done]` is set at the end ("ok" or
// "error"); the browser check waits for it.
import { runScenario } from "./scenario.js";

const $ = (id) => document.getElementById(id);
const log = (line) => { $("log").textContent += `${line}\n`; };

function show(where, result) {
  $(`${where}-text`).textContent = result.text;
  for (const side of ["alice", "bob"]) {
    const list = $(`${where}-${side}-emoji`);
    list.replaceChildren(...result[`${side}Emoji`].map((e) => {
      const item = document.createElement("li");
      item.textContent = `${e.symbol} ${e.description}`;
      return item;
    }));
  }
  $(`${where}-verified`).textContent =
    `alice: ${result.verified.alice.state}, trusts bob's device: ${result.verified.aliceTrustsBob}; ` +
    `bob: ${result.verified.bob.state}, trusts alice's device: ${result.verified.bobTrustsAlice}`;
  $(`${where}-reopen`).textContent =
    `wrong passphrase: ${result.reopen.wrongPassphrase}; same identity keys: ${result.reopen.sameKeys}; ` +
    `still trusts bob: ${result.reopen.stillTrustsBob}`;
}

function inWorker() {
  return new Promise((resolve, reject) => {
    const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    worker.onmessage = ({ data }) => {
      worker.terminate();
      if (data.error) reject(new Error(`in the worker: ${data.error}`));
      else resolve(data.result);
    };
    worker.onerror = (e) => {
      worker.terminate();
      reject(new Error(`in the worker: ${e.message}`));
    };
  });
}

const status = $("status");
try {
  show("page", await runScenario("newt-example-page", log));
  log("the same in a Web Worker");
  show("worker", await inWorker());
  log("done");
  status.textContent = "done";
  status.dataset.done = "ok";
} catch (e) {
  status.textContent = `failed: ${e.code ?? e.name}: ${e.message}`;
  status.dataset.done = "error";
  throw e;
}
