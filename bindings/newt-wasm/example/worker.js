// The same scenario in a dedicated (module) Web Worker: posts its result, or
// the error, to the page.
import { runScenario } from "./scenario.js";

runScenario("newt-example-worker").then(
  (result) => postMessage({ result }),
  (e) => postMessage({ error: `${e.code ?? e.name}: ${e.message}` }),
);
