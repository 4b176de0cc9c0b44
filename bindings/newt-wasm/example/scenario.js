// The example's scenario, shared by the page (main.js) and the Web Worker
// (worker.js): two devices, alice and bob, each on its own encrypted
// IndexedDB store, talk through the JS homeserver stand-in (server.mjs, in
// this same page or worker): alice sends bob an encrypted room message, then
// they verify each other by emoji (SAS, to-device). Finally alice's store is
// reopened (same passphrase: same device; wrong one: WrongKey) and both
// stores are deleted, as a sign-out would.
//
// It imports the installed npm package straight from node_modules (no
// bundler, no import map: module workers do not read import maps).
import init, { Machine, deleteStore } from "./node_modules/newt-wasm/newt.js";
import { Server } from "./server.mjs";

const ROOM = "!example:example.org";
const ALICE = "@alice:example.org";
const BOB = "@bob:example.org";

/** A device on the stand-in server: sends what newt asks, feeds it /sync. */
class Client {
  constructor(server, machine) {
    this.server = server;
    this.machine = machine;
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
      await this.machine.receiveSync(sync);
      const requests = await this.machine.outgoingRequests();
      await this.send(requests);
      if (requests.length === 0 && sync.toDeviceEvents.length === 0 && sync.changedUsers.length === 0) return;
    }
  }
}

/**
 * Runs the exchange; `prefix` keeps the page's databases apart from the
 * worker's. Returns what the page shows: the decrypted text, both sides'
 * emoji, and the checks on the stores.
 */
export async function runScenario(prefix, log = () => {}) {
  await init();
  const aliceDb = `${prefix}-alice`;
  const bobDb = `${prefix}-bob`;
  // A fresh start (a previous run may have left its databases).
  await deleteStore(aliceDb);
  await deleteStore(bobDb);

  const server = new Server();
  log("opening alice (passphrase: Argon2id, about a second) and bob (raw key)");
  const bobKey = crypto.getRandomValues(new Uint8Array(32));
  const alice = new Client(server, await Machine.open(ALICE, "ALICE1", { store: { name: aliceDb, passphrase: "correct horse" } }));
  const bob = new Client(server, await Machine.open(BOB, "BOB1", { store: { name: bobDb, key: bobKey } }));
  await alice.settle();
  await bob.settle();

  log("alice shares a room key with bob and sends an encrypted message");
  const members = [ALICE, BOB];
  await alice.machine.updateTrackedUsers(members);
  await bob.machine.updateTrackedUsers(members);
  await alice.settle();
  await bob.settle();
  const claim = await alice.machine.getMissingSessions(members);
  if (claim) await alice.send([claim]);
  await alice.send(await alice.machine.shareRoomKey(ROOM, members));
  const content = await alice.machine.encryptRoomEvent(ROOM, "m.room.message", {
    msgtype: "m.text", body: "hello bob, from a browser",
  });
  const eventId = server.sendRoomEvent(ALICE, ROOM, "m.room.encrypted", content);
  const event = server.roomEvents(ROOM).find((e) => e.event_id === eventId);

  log("bob syncs and decrypts");
  await bob.settle();
  const decrypted = await bob.machine.decryptRoomEvent(ROOM, event);

  log("alice asks bob to verify by emoji");
  const { flowId, request } = await alice.machine.requestVerification(BOB, "BOB1");
  await alice.send([request]);
  await bob.settle();
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
  // Here both users compare the emoji on their screens; they match.
  await alice.machine.confirmSas(flowId);
  await bob.machine.confirmSas(flowId);
  for (let i = 0; i < 3; i++) {
    await alice.settle();
    await bob.settle();
  }
  const verified = {
    alice: await alice.machine.verificationState(flowId),
    bob: await bob.machine.verificationState(flowId),
    aliceTrustsBob: await alice.machine.deviceTrust(BOB, "BOB1"),
    bobTrustsAlice: await bob.machine.deviceTrust(ALICE, "ALICE1"),
  };

  log("reopening alice's store: the same device comes back; a wrong passphrase is refused");
  const keys = await alice.machine.identityKeys();
  alice.machine.free();
  const wrong = await Machine.open(ALICE, "ALICE1", { store: { name: aliceDb, passphrase: "wrong" } })
    .then(() => "opened", (e) => e.code);
  const reopened = await Machine.open(ALICE, "ALICE1", { store: { name: aliceDb, passphrase: "correct horse" } });
  const sameKeys = (await reopened.identityKeys()).ed25519 === keys.ed25519;
  const stillTrustsBob = await reopened.deviceTrust(BOB, "BOB1");
  reopened.free();

  log("signing out: both stores deleted");
  bob.machine.free();
  await deleteStore(aliceDb);
  await deleteStore(bobDb);

  return {
    text: decrypted.content.body,
    sender: decrypted.sender,
    aliceEmoji,
    bobEmoji,
    verified,
    reopen: { wrongPassphrase: wrong, sameKeys, stillTrustsBob },
  };
}
