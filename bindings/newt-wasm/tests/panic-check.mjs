// A panic inside newt (a bug; never from bad input) rejects the call that
// hit it with a NewtError of code "Panic", and every later call rejects at
// once with the same clear error instead of hanging. A plain script, not a
// node:test file: the test runner counts the instance's trap (see below) as
// a failure of its own.
import assert from "node:assert/strict";

import init, * as newt from "newt-wasm";

await init();

// The instance traps after the hook ran: that trap surfaces from the event
// loop as an uncaught RuntimeError (in Node an app must handle it with
// process.on("uncaughtException") or the process ends). Count it here.
const traps = [];
process.on("uncaughtException", (e) => {
  if (e instanceof WebAssembly.RuntimeError) traps.push(e);
  else throw e;
});

{
  const machine = await newt.Machine.open("@alice:example.org", "ALICE1");
  await machine.outgoingRequests();
  await assert.rejects(newt.__newtTestPanic(), (e) => {
    assert.equal(e.name, "NewtError");
    assert.equal(e.code, "Panic");
    assert.match(e.message, /index out of bounds/);
    return true;
  });
  await assert.rejects(machine.outgoingRequests(), { name: "NewtError", code: "Panic" });
  await assert.rejects(newt.Machine.open("@bob:example.org", "BOB1"), { code: "Panic" });
  await new Promise((resolve) => setTimeout(resolve, 10));
  assert.equal(traps.length, 1);
}
console.log("ok - a panic rejects the call and every later one with code Panic");
