// The README's example, type-checked with `tsc --noEmit --strict` against
// the installed package (it is not run: node.test.mjs runs the same calls).
import init, { Machine, deleteStore, type DecryptedEvent, type NewtError, type OutgoingRequest } from "newt-wasm";

async function send(machine: Machine, requests: OutgoingRequest[]): Promise<void> {
  for (const r of requests) {
    const response = await fetch(`https://matrix.example.org/_matrix/client/v3${r.path}`, {
      method: r.method,
      body: r.body,
      headers: { "content-type": "application/json", authorization: "Bearer TOKEN" },
    });
    await machine.markRequestSent(r.id, await response.text());
  }
}

export async function main(): Promise<void> {
  await init();
  const machine = await Machine.open("@alice:example.org", "ALICE1");
  await send(machine, await machine.outgoingRequests());
  await machine.updateTrackedUsers(["@bob:example.org"]);
  const outcome = await machine.receiveSync({ toDeviceEvents: [], changedUsers: [], nextBatch: "s1" });
  for (const event of outcome) {
    if (event.outcome === "Rejected") console.warn(event.type, event.error);
  }
  const claim = await machine.getMissingSessions(["@bob:example.org"]);
  if (claim) await send(machine, [claim]);
  await send(machine, await machine.shareRoomKey("!room:example.org", ["@bob:example.org"], { policy: "ExcludeBlacklisted" }));
  const content: object = await machine.encryptRoomEvent("!room:example.org", "m.room.message", { body: "hi" });
  console.log(content);
  try {
    const event: DecryptedEvent = await machine.decryptRoomEvent("!room:example.org", { type: "m.room.encrypted" });
    const label: string = event.trust === "Verified" ? "" : event.trust;
    console.log(event.content, label);
  } catch (e) {
    const error = e as NewtError;
    if (error.code === "MissingSession") console.log("waiting for the key", error.withheldCode);
  }
}

// In a browser: the device on an encrypted IndexedDB store, then sign-out.
export async function persistent(passphrase: string, key: Uint8Array): Promise<void> {
  const byPassphrase = await Machine.open("@alice:example.org", "ALICE1", { store: { name: "newt-alice", passphrase } });
  byPassphrase.free();
  try {
    const byKey = await Machine.open("@bob:example.org", "BOB1", { store: { name: "newt-bob", key } });
    byKey.free();
  } catch (e) {
    if ((e as NewtError).code === "WrongKey") console.log("not this key");
  }
  await deleteStore("newt-alice");
}
