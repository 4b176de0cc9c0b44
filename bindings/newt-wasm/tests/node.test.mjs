// newt-wasm in Node, on the installed package: two devices talk through the
// JS stand-in server (Olm, Megolm, a device added later, export/import with
// progress, SAS by emoji), and bad inputs give typed errors.
import { test } from "node:test";
import assert from "node:assert/strict";

import init, { Machine, deleteStore } from "newt-wasm";
import { Server } from "./server.mjs";

const wasm = await init();

const ROOM = "!room:example.org";

/** A device on the server: sends what newt asks, feeds what the server has. */
class Client {
  constructor(server, machine) {
    this.server = server;
    this.machine = machine;
  }

  static async open(server, user, device) {
    return new Client(server, await Machine.open(user, device));
  }

  async send(requests) {
    for (const r of requests) {
      const response = this.server.handle(this.machine.userId, this.machine.deviceId, r);
      await this.machine.markRequestSent(r.id, response);
    }
  }

  /** Sends every outgoing request and syncs until nothing is left. */
  async settle() {
    for (let i = 0; i < 5; i++) {
      const sync = this.server.sync(this.machine.userId, this.machine.deviceId);
      const processed = await this.machine.receiveSync(sync);
      const requests = await this.machine.outgoingRequests();
      await this.send(requests);
      if (requests.length === 0 && sync.toDeviceEvents.length === 0 && sync.changedUsers.length === 0) {
        return processed;
      }
    }
  }

  async shareAndSend(members, text) {
    await this.machine.updateTrackedUsers(members);
    await this.settle();
    const claim = await this.machine.getMissingSessions(members);
    if (claim) await this.send([claim]);
    await this.send(await this.machine.shareRoomKey(ROOM, members));
    const content = await this.machine.encryptRoomEvent(ROOM, "m.room.message", { msgtype: "m.text", body: text });
    const eventId = this.server.sendRoomEvent(this.machine.userId, ROOM, "m.room.encrypted", content);
    return this.server.roomEvents(ROOM).find((e) => e.event_id === eventId);
  }
}

async function pair() {
  const server = new Server();
  const alice = await Client.open(server, "@alice:example.org", "ALICE1");
  const bob = await Client.open(server, "@bob:example.org", "BOB1");
  await alice.settle();
  await bob.settle();
  return { server, alice, bob };
}

test("Olm and Megolm between two devices", async () => {
  const { alice, bob } = await pair();
  const event = await alice.shareAndSend(["@alice:example.org", "@bob:example.org"], "hello bob");
  await bob.machine.updateTrackedUsers(["@alice:example.org"]);
  const processed = await bob.settle();
  assert.ok(processed !== undefined);
  const decrypted = await bob.machine.decryptRoomEvent(ROOM, event);
  assert.equal(decrypted.content.body, "hello bob");
  assert.equal(decrypted.sender, "@alice:example.org");
  assert.equal(decrypted.senderDevice, "ALICE1");
  assert.equal(decrypted.trust, "Unverified");

  const batch = await bob.machine.decryptRoomEvents(ROOM, [event, { ...event, content: {} }]);
  assert.equal(batch[0].event.content.body, "hello bob");
  assert.equal(batch[1].error.code, "DecryptionFailed");
});

test("a device added later gets the next messages", async () => {
  const { server, alice, bob } = await pair();
  const members = ["@alice:example.org", "@bob:example.org"];
  await alice.shareAndSend(members, "before");
  const bob2 = await Client.open(server, "@bob:example.org", "BOB2");
  await bob2.settle();
  await alice.settle();
  const event = await alice.shareAndSend(members, "after");
  await bob2.machine.updateTrackedUsers(["@alice:example.org"]);
  await bob2.settle();
  const decrypted = await bob2.machine.decryptRoomEvent(ROOM, event);
  assert.equal(decrypted.content.body, "after");
  await bob.settle();
  assert.equal((await bob.machine.decryptRoomEvent(ROOM, event)).content.body, "after");
});

test("export and import room keys with progress", async () => {
  const { alice, bob } = await pair();
  const event = await alice.shareAndSend(["@alice:example.org", "@bob:example.org"], "exported");
  const exportProgress = [];
  const file = await alice.machine.exportRoomKeys("pass phrase", 1000, (done, total) => exportProgress.push([done, total]));
  assert.match(file, /^-----BEGIN MEGOLM SESSION DATA-----/);
  assert.ok(exportProgress.length > 0);

  const importProgress = [];
  const summary = await bob.machine.importRoomKeys(file, "pass phrase", (done, total) => importProgress.push([done, total]));
  assert.deepEqual(summary, { total: 1, imported: 1, skipped: 0 });
  assert.deepEqual(importProgress.at(-1), [1, 1]);
  const decrypted = await bob.machine.decryptRoomEvent(ROOM, event);
  assert.equal(decrypted.content.body, "exported");
  assert.equal(decrypted.trust, "Unauthenticated");

  await assert.rejects(bob.machine.importRoomKeys(file, "wrong", undefined), { name: "NewtError", code: "KeyExport" });
  await assert.rejects(bob.machine.importRoomKeys(file.slice(0, 80), "pass phrase", undefined), { code: "KeyExport" });
});

test("SAS verification to-device shows the same emoji on both sides", async () => {
  const { alice, bob } = await pair();
  await alice.machine.updateTrackedUsers(["@bob:example.org"]);
  await bob.machine.updateTrackedUsers(["@alice:example.org"]);
  await alice.settle();
  await bob.settle();
  const { flowId, request } = await alice.machine.requestVerification("@bob:example.org", "BOB1");
  await alice.send([request]);
  await bob.settle();
  const flows = await bob.machine.verificationFlows();
  assert.equal(flows.length, 1);
  assert.equal(flows[0].state.state, "RequestReceived");
  await bob.machine.acceptVerification(flowId);
  await bob.settle();
  await alice.settle();
  await alice.machine.startSas(flowId);
  for (let i = 0; i < 3; i++) {
    await alice.settle();
    await bob.settle();
  }
  const aliceEmoji = await alice.machine.sasEmoji(flowId);
  const bobEmoji = await bob.machine.sasEmoji(flowId);
  assert.equal(aliceEmoji.length, 7);
  assert.deepEqual(aliceEmoji, bobEmoji);
  assert.deepEqual(await alice.machine.sasDecimals(flowId), await bob.machine.sasDecimals(flowId));
  await alice.machine.confirmSas(flowId);
  await bob.machine.confirmSas(flowId);
  for (let i = 0; i < 3; i++) {
    await alice.settle();
    await bob.settle();
  }
  assert.deepEqual(await alice.machine.verificationState(flowId), { state: "Done" });
  assert.deepEqual(await bob.machine.verificationState(flowId), { state: "Done" });
  assert.equal(await alice.machine.deviceTrust("@bob:example.org", "BOB1"), "LocallyVerified");
  assert.equal(await bob.machine.deviceTrust("@alice:example.org", "ALICE1"), "LocallyVerified");
});

test("bad inputs give typed errors", async () => {
  const { bob } = await pair();
  await assert.rejects(Machine.open("not a user id", "D"), { name: "NewtError", code: "InvalidId" });
  // Store options: a malformed one is refused; Node has no IndexedDB.
  await assert.rejects(Machine.open("@a:example.org", "D", { store: { name: "db", key: new Uint8Array(31) } }), { code: "InvalidArgument" });
  await assert.rejects(Machine.open("@a:example.org", "D", { store: { name: "db" } }), { code: "InvalidArgument" });
  await assert.rejects(Machine.open("@a:example.org", "D", 7), { code: "InvalidArgument" });
  await assert.rejects(Machine.open("@a:example.org", "D", { store: { name: "db", passphrase: "p" } }), { code: "StoreBackend" });
  await assert.rejects(deleteStore("db"), { code: "StoreBackend" });
  await assert.rejects(bob.machine.decryptRoomEvent(ROOM, { content: {} }), { code: "DecryptionFailed" });
  await assert.rejects(bob.machine.decryptRoomEvent(ROOM, "{not json"), { code: "InvalidArgument" });
  await assert.rejects(bob.machine.markRequestSent("no-such-request", {}), { code: "UnknownRequest" });
  await assert.rejects(bob.machine.receiveSync({ toDeviceEvents: 3 }), { code: "InvalidArgument" });
  await assert.rejects(bob.machine.shareRoomKey(ROOM, [], { policy: "Nobody" }), { code: "InvalidArgument" });
  const missing = {
    type: "m.room.encrypted", sender: "@alice:example.org", event_id: "$x", origin_server_ts: 1,
    content: {
      algorithm: "m.megolm.v1.aes-sha2", sender_key: "x", device_id: "ALICE1",
      session_id: "AAAA", ciphertext: "AwgAEhAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    },
  };
  const err = await bob.machine.decryptRoomEvent(ROOM, missing).then(() => null, (e) => e);
  assert.ok(err instanceof Error);
  assert.ok(["MissingSession", "DecryptionFailed"].includes(err.code), err.code);
});

test("10,000 encrypt and decrypt calls do not grow wasm memory without bound", async () => {
  const { alice, bob } = await pair();
  await alice.machine.updateTrackedUsers(["@bob:example.org"]);
  await alice.settle();
  const claim = await alice.machine.getMissingSessions(["@bob:example.org"]);
  if (claim) await alice.send([claim]);
  await alice.send(await alice.machine.shareRoomKey(ROOM, ["@bob:example.org"], { rotationPeriodMsgs: 1000000 }));
  await bob.settle();
  const content = await alice.machine.encryptRoomEvent(ROOM, "m.room.message", { body: "same" });
  const event = { type: "m.room.encrypted", sender: "@alice:example.org", event_id: "$same", origin_server_ts: 1, content };
  const round = async (n) => {
    for (let i = 0; i < n; i++) {
      await alice.machine.encryptRoomEvent(ROOM, "m.room.message", { body: `message ${i}` });
      const d = await bob.machine.decryptRoomEvent(ROOM, event);
      assert.equal(d.content.body, "same");
    }
  };
  await round(1000); // warm up: caches, allocator
  const before = wasm.memory.buffer.byteLength;
  await round(9000);
  const after = wasm.memory.buffer.byteLength;
  assert.ok(after - before <= 1 << 20, `wasm memory grew from ${before} to ${after} bytes`);
});
