// Node entry point: the same module as in browsers, except that `init()`
// without an argument reads the .wasm file next to this one (Node's fetch
// cannot load file: URLs).
import initWeb from "./newt.js";

export * from "./newt.js";

export default async function init(input) {
  if (input === undefined) {
    const { readFile } = await import("node:fs/promises");
    input = await readFile(new URL("./newt_bg.wasm", import.meta.url));
  }
  return initWeb({ module_or_path: await input });
}
