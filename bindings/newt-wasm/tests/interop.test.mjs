// newt-wasm against @matrix-org/matrix-sdk-crypto-wasm 18.9 (matrix-sdk-crypto
// inside), both in Node, through the same JS stand-in server: Olm sessions
// made by either side, to-device messages and room keys over Olm, Megolm
// room messages each way, m.room_key.withheld each way, room key export
// files each way, SAS verification to-device started by either side (also
// with cross-signing on both sides), and room key requests between two
// devices of one user.
import { test } from "node:test";
import assert from "node:assert/strict";

import init, { Machine } from "newt-wasm";
import {
  OlmMachine, UserId, RoomId, ProcessedToDeviceEventType, EncryptionSettings, CollectStrategy, LocalTrust,
} from "@matrix-org/matrix-sdk-crypto-wasm";
import { Server } from "./server.mjs";
import { CryptoWasmClient } from "./crypto-wasm-client.mjs";

await init();

const ROOM = "!room:example.org";
const ALICE = "@alice:example.org"; // newt
const BOB = "@bob:example.org"; // crypto-wasm

/** A newt device on the server (as in node.test.mjs). */
class NewtClient {
  constructor(server, machine) {
    this.server = server;
    this.machine = machine;
  }

  static async open(server, user, device) {
    return new NewtClient(server, await Machine.open(user, device));
  }

  async send(requests) {
    for (const r of requests) {
      const response = this.server.handle(this.machine.userId, this.machine.deviceId, r);
      await this.machine.markRequestSent(r.id, response);
    }
  }

  /** Sends every outgoing request and syncs until nothing is left; returns all processed events. */
  async settle() {
    const all = [];
    for (let i = 0; i < 5; i++) {
      const sync = this.server.sync(this.machine.userId, this.machine.deviceId);
      all.push(...await this.machine.receiveSync(sync));
      const requests = await this.machine.outgoingRequests();
      await this.send(requests);
      if (requests.length === 0 && sync.toDeviceEvents.length === 0 && sync.changedUsers.length === 0) break;
    }
    return all;
  }

  async track(users) {
    await this.machine.updateTrackedUsers(users);
    await this.settle();
  }

  async shareAndSend(roomId, members, text) {
    await this.track(members);
    const claim = await this.machine.getMissingSessions(members);
    if (claim) await this.send([claim]);
    await this.send(await this.machine.shareRoomKey(roomId, members));
    const content = await this.machine.encryptRoomEvent(roomId, "m.room.message", { msgtype: "m.text", body: text });
    const eventId = this.server.sendRoomEvent(this.machine.userId, roomId, "m.room.encrypted", content);
    return this.server.roomEvents(roomId).find((e) => e.event_id === eventId);
  }
}

/** newt's alice and crypto-wasm's bob, keys uploaded, each tracking the other. */
async function pair() {
  const server = new Server();
  const alice = await NewtClient.open(server, ALICE, "ALICE1");
  const bob = await CryptoWasmClient.open(server, BOB, "BOB1");
  await alice.settle();
  await bob.settle();
  await alice.track([ALICE, BOB]);
  await bob.track([ALICE, BOB]);
  return { server, alice, bob };
}

/** Both sides settle until the server has nothing left for them. */
async function settleBoth(a, b, rounds = 3) {
  for (let i = 0; i < rounds; i++) {
    await a.settle();
    await b.settle();
  }
}

/** The Olm message types (0 pre-key, 1 normal) of the m.room.encrypted events waiting for a device. */
function olmTypes(server, user, device, curve25519) {
  return (server.inbox.get(`${user}|${device}`) ?? [])
    .filter((e) => e.type === "m.room.encrypted")
    .map((e) => {
      assert.equal(e.content.algorithm, "m.olm.v1.curve25519-aes-sha2");
      return e.content.ciphertext[curve25519].type;
    });
}

/** crypto-wasm's decrypted to-device events, as `{type, content, sender, senderDevice, senderKey}`. */
function decryptedToDevice(processed) {
  return processed
    .filter((p) => p.type === ProcessedToDeviceEventType.Decrypted)
    .map((p) => {
      const raw = JSON.parse(p.rawEvent);
      return {
        type: raw.type, content: raw.content, sender: p.encryptionInfo.sender.toString(),
        senderDevice: p.encryptionInfo.senderDevice?.toString(), senderKey: p.encryptionInfo.senderCurve25519Key,
      };
    });
}

test("newt makes the Olm session: room key newt -> crypto-wasm, then Olm and Megolm back", async () => {
  const { alice, bob } = await pair();
  const aliceKeys = await alice.machine.identityKeys();
  const bobDevice = (await alice.machine.devices(BOB)).find((d) => d.deviceId === "BOB1");
  assert.ok(bobDevice, "newt sees the crypto-wasm device after /keys/query");

  // newt claims a one-time key of crypto-wasm's, shares its room key over Olm (pre-key message).
  const fromNewt = await alice.shareAndSend(ROOM, [ALICE, BOB], "hello from newt");
  const bobCurve = bob.machine.identityKeys.curve25519.toBase64();
  assert.deepEqual(olmTypes(alice.server, BOB, "BOB1", bobCurve), [0]);
  const got = decryptedToDevice(await bob.settle());
  const roomKey = got.find((e) => e.type === "m.room_key");
  assert.ok(roomKey, `crypto-wasm decrypted newt's m.room_key over Olm: ${JSON.stringify(got)}`);
  assert.equal(roomKey.sender, ALICE);
  assert.equal(roomKey.senderKey, aliceKeys.curve25519);
  assert.equal(roomKey.content.room_id, ROOM);

  // crypto-wasm decrypts newt's Megolm message.
  const d = await bob.decrypt(ROOM, fromNewt);
  assert.equal(d.event.content.body, "hello from newt");
  assert.equal(d.event.type, "m.room.message");
  assert.equal(d.sender, ALICE);
  assert.equal(d.senderDevice, "ALICE1");
  assert.equal(d.senderKey, aliceKeys.curve25519);
  assert.equal(d.claimedEd25519, aliceKeys.ed25519);

  // crypto-wasm answers on the session newt made (no claim): a custom
  // to-device event, then its own room key, then a Megolm message.
  assert.equal(await bob.machine.getMissingSessions([new UserId(ALICE)]) ?? undefined, undefined, "crypto-wasm reuses the session newt made");
  const aliceDevice = await bob.getDevice(ALICE, "ALICE1");
  const encrypted = await aliceDevice.encryptToDeviceEvent("org.example.ping", { n: 1 });
  bob.server.sendToDevice(BOB, "m.room.encrypted", { messages: { [ALICE]: { ALICE1: JSON.parse(encrypted) } } });
  const fromCw = await bob.shareAndSend(ROOM, [ALICE, BOB], "hello from crypto-wasm");
  assert.deepEqual(olmTypes(alice.server, ALICE, "ALICE1", aliceKeys.curve25519), [1, 1]);
  const processed = await alice.settle();
  const ping = processed.find((p) => p.type === "org.example.ping");
  assert.ok(ping, `newt decrypted crypto-wasm's to-device event: ${JSON.stringify(processed)}`);
  assert.equal(ping.outcome, "ForApp");
  assert.equal(ping.encrypted, true);
  assert.deepEqual(ping.content.n, 1);
  assert.equal(ping.sender, BOB);
  assert.equal(ping.senderDevice, "BOB1");
  const key = processed.find((p) => p.type === "m.room_key");
  assert.ok(key, `newt got crypto-wasm's room key: ${JSON.stringify(processed)}`);
  assert.equal(key.outcome, "RoomKeyStored");
  assert.equal(key.senderDevice, "BOB1");

  const m = await alice.machine.decryptRoomEvent(ROOM, fromCw);
  assert.equal(m.content.body, "hello from crypto-wasm");
  assert.equal(m.sender, BOB);
  assert.equal(m.senderDevice, "BOB1");
  assert.equal(m.trust, "Unverified");

  // newt's next room key goes over the same session, now a normal message;
  // crypto-wasm follows the ratchet and newt's Megolm ratchet past index 0.
  await alice.machine.discardRoomKey(ROOM);
  const second = await alice.shareAndSend(ROOM, [ALICE, BOB], "new session, index 0");
  const third = await alice.machine.encryptRoomEvent(ROOM, "m.room.message", { msgtype: "m.text", body: "index 1" });
  const thirdEvent = { ...second, event_id: "$third", content: third };
  assert.deepEqual(olmTypes(alice.server, BOB, "BOB1", bobCurve), [1]);
  assert.ok(decryptedToDevice(await bob.settle()).some((e) => e.type === "m.room_key"));
  assert.notEqual(second.content.session_id, fromNewt.content.session_id);
  assert.equal((await bob.decrypt(ROOM, second)).event.content.body, "new session, index 0");
  assert.equal((await bob.decrypt(ROOM, thirdEvent)).event.content.body, "index 1");
  assert.equal((await bob.decrypt(ROOM, fromNewt)).event.content.body, "hello from newt");
});

test("crypto-wasm makes the Olm session: room key crypto-wasm -> newt, then Olm and Megolm back", async () => {
  const { alice, bob } = await pair();
  const bobKeys = bob.machine.identityKeys;

  // crypto-wasm claims newt's one-time key and shares its room key (pre-key message to newt).
  const fromCw = await bob.shareAndSend(ROOM, [ALICE, BOB], "first from crypto-wasm");
  const processed = await alice.settle();
  const key = processed.find((p) => p.type === "m.room_key");
  assert.ok(key, `newt got crypto-wasm's room key: ${JSON.stringify(processed)}`);
  assert.equal(key.outcome, "RoomKeyStored");
  assert.equal(key.encrypted, true);
  assert.equal(key.sender, BOB);
  assert.equal(key.senderDevice, "BOB1");
  assert.equal(key.senderKey, bobKeys.curve25519.toBase64());
  const m = await alice.machine.decryptRoomEvent(ROOM, fromCw);
  assert.equal(m.content.body, "first from crypto-wasm");
  assert.equal(m.sender, BOB);
  assert.equal(m.senderDevice, "BOB1");

  // newt answers on the session crypto-wasm made (no claim needed).
  assert.equal(await alice.machine.getMissingSessions([BOB]), undefined, "newt reuses the session crypto-wasm made");
  const fromNewt = await alice.shareAndSend(ROOM, [ALICE, BOB], "reply from newt");
  const got = decryptedToDevice(await bob.settle());
  assert.ok(got.some((e) => e.type === "m.room_key" && e.sender === ALICE), JSON.stringify(got));
  const d = await bob.decrypt(ROOM, fromNewt);
  assert.equal(d.event.content.body, "reply from newt");
  assert.equal(d.sender, ALICE);
  assert.equal(d.senderDevice, "ALICE1");
});

test("withheld room keys: each side reads the other's m.room_key.withheld", async () => {
  const { alice, bob } = await pair();
  // newt shares with verified devices only: crypto-wasm's unverified device is withheld.
  await alice.track([ALICE, BOB]);
  const claim = await alice.machine.getMissingSessions([BOB]);
  if (claim) await alice.send([claim]);
  await alice.send(await alice.machine.shareRoomKey(ROOM, [ALICE, BOB], { policy: "VerifiedOnly" }));
  const content = await alice.machine.encryptRoomEvent(ROOM, "m.room.message", { msgtype: "m.text", body: "secret" });
  const id = alice.server.sendRoomEvent(ALICE, ROOM, "m.room.encrypted", content);
  const event = alice.server.roomEvents(ROOM).find((e) => e.event_id === id);
  await bob.settle();
  const err = await bob.decrypt(ROOM, event).then(() => null, (e) => e);
  assert.ok(err, "crypto-wasm cannot decrypt a withheld key");
  assert.equal(err.withheldCode, "m.unverified", `crypto-wasm: ${err.description}`);

  // crypto-wasm shares with trusted devices only: newt's unverified device is withheld.
  const room2 = "!room2:example.org";
  const users = () => [ALICE, BOB].map((u) => new UserId(u));
  const cwClaim = await bob.machine.getMissingSessions(users());
  if (cwClaim) await bob.send([cwClaim]);
  const settings = new EncryptionSettings();
  settings.sharingStrategy = CollectStrategy.onlyTrustedDevices();
  await bob.send(await bob.machine.shareRoomKey(new RoomId(room2), users(), settings));
  const cwContent = await bob.machine.encryptRoomEvent(new RoomId(room2), "m.room.message", JSON.stringify({ body: "secret" }));
  const id2 = bob.server.sendRoomEvent(BOB, room2, "m.room.encrypted", JSON.parse(cwContent));
  const event2 = bob.server.roomEvents(room2).find((e) => e.event_id === id2);
  const processed = await alice.settle();
  assert.ok(processed.some((p) => p.outcome === "WithheldStored"), JSON.stringify(processed));
  await assert.rejects(alice.machine.decryptRoomEvent(room2, event2), { code: "MissingSession", withheldCode: "m.unverified" });
});

test("key export file: newt exports, crypto-wasm imports and decrypts", async () => {
  const server = new Server();
  const alice = await NewtClient.open(server, ALICE, "ALICE1");
  await alice.settle();
  const event = await alice.shareAndSend(ROOM, [ALICE], "exported by newt");
  const file = await alice.machine.exportRoomKeys("pass phrase", 1000, undefined);
  assert.match(file, /^-----BEGIN MEGOLM SESSION DATA-----/);

  // A crypto-wasm device that never received the key over Olm.
  const carol = await CryptoWasmClient.open(server, "@carol:example.org", "CAROL1");
  await carol.settle();
  await carol.track([ALICE]);
  const keys = OlmMachine.decryptExportedRoomKeys(file, "pass phrase");
  const progress = [];
  const result = await carol.machine.importExportedRoomKeys(keys, (done, total) => progress.push([done, total]));
  assert.equal(result.totalCount, 1);
  assert.equal(result.importedCount, 1);
  assert.throws(() => OlmMachine.decryptExportedRoomKeys(file, "wrong"));

  const aliceKeys = await alice.machine.identityKeys();
  const d = await carol.decrypt(ROOM, event);
  assert.equal(d.event.content.body, "exported by newt");
  assert.equal(d.sender, ALICE);
  assert.equal(d.senderKey, aliceKeys.curve25519);
  assert.equal(d.claimedEd25519, aliceKeys.ed25519);
});

test("key export file: crypto-wasm exports, newt imports and decrypts", async () => {
  const server = new Server();
  const bob = await CryptoWasmClient.open(server, BOB, "BOB1");
  await bob.settle();
  const event = await bob.shareAndSend(ROOM, [BOB], "exported by crypto-wasm");
  const keys = await bob.machine.exportRoomKeys(() => true);
  assert.equal(JSON.parse(keys).length, 1);
  const file = OlmMachine.encryptExportedRoomKeys(keys, "pass phrase", 1000);

  // A newt device that never received the key over Olm.
  const dave = await NewtClient.open(server, "@dave:example.org", "DAVE1");
  await dave.settle();
  await dave.track([BOB]);
  const summary = await dave.machine.importRoomKeys(file, "pass phrase", undefined);
  assert.deepEqual(summary, { total: 1, imported: 1, skipped: 0 });
  await assert.rejects(dave.machine.importRoomKeys(file, "wrong", undefined), { code: "KeyExport" });

  const m = await dave.machine.decryptRoomEvent(ROOM, event);
  assert.equal(m.content.body, "exported by crypto-wasm");
  assert.equal(m.sender, BOB);
  assert.equal(m.trust, "Unauthenticated");
});

/** Emoji as `symbol description` strings, to compare newt's with crypto-wasm's. */
const names = (list) => list.map((e) => `${e.symbol} ${e.description}`);

/** After SAS: both sides done and each sees the other device verified. */
async function assertVerified(alice, bob, sas, flowId) {
  assert.deepEqual(await alice.machine.verificationState(flowId), { state: "Done" });
  assert.ok(sas.isDone(), "crypto-wasm's SAS is done");
  assert.equal(await alice.machine.deviceTrust(BOB, "BOB1"), "LocallyVerified");
  const aliceDevice = await bob.getDevice(ALICE, "ALICE1");
  assert.ok(aliceDevice.isLocallyTrusted(), "crypto-wasm trusts newt's device locally");
  assert.ok(aliceDevice.isVerified(), "crypto-wasm sees newt's device verified");
}

test("SAS to-device: newt asks, crypto-wasm accepts, newt starts SAS", async () => {
  const { alice, bob } = await pair();
  const { flowId, request } = await alice.machine.requestVerification(BOB, "BOB1");
  await alice.send([request]);
  await bob.settle();
  const incoming = bob.machine.getVerificationRequest(new UserId(ALICE), flowId);
  assert.ok(incoming, "crypto-wasm got newt's m.key.verification.request");
  await bob.send([incoming.accept()]);
  await alice.settle();
  assert.deepEqual(await alice.machine.verificationState(flowId), { state: "Ready" });

  await alice.machine.startSas(flowId);
  await alice.settle();
  await bob.settle();
  const sas = bob.machine.getVerification(new UserId(ALICE), flowId);
  assert.ok(sas, "crypto-wasm got newt's m.key.verification.start");
  await bob.send([sas.accept()]);
  await settleBoth(alice, bob);

  const aliceEmoji = await alice.machine.sasEmoji(flowId);
  const bobEmoji = sas.emoji();
  assert.ok(aliceEmoji && bobEmoji, "both sides show emoji");
  assert.equal(aliceEmoji.length, 7);
  assert.deepEqual(names(aliceEmoji), names(bobEmoji));
  assert.deepEqual(await alice.machine.sasDecimals(flowId), [...sas.decimals()]);

  await alice.machine.confirmSas(flowId);
  await bob.send(await sas.confirm());
  await settleBoth(alice, bob);
  await assertVerified(alice, bob, sas, flowId);
});

test("SAS to-device: crypto-wasm asks, newt accepts, crypto-wasm starts SAS", async () => {
  const { alice, bob } = await pair();
  const aliceDevice = await bob.getDevice(ALICE, "ALICE1");
  const [request, toDevice] = aliceDevice.requestVerification();
  await bob.send([toDevice]);
  const flowId = request.flowId;
  await alice.settle();
  const flows = await alice.machine.verificationFlows();
  assert.equal(flows.length, 1);
  assert.equal(flows[0].flowId, flowId);
  assert.equal(flows[0].state.state, "RequestReceived");
  await alice.machine.acceptVerification(flowId);
  await alice.settle();
  await bob.settle();
  assert.ok(request.isReady(), "crypto-wasm got newt's m.key.verification.ready");

  const [sas, start] = await request.startSas();
  await bob.send([start]);
  await settleBoth(alice, bob);

  const aliceEmoji = await alice.machine.sasEmoji(flowId);
  const bobEmoji = sas.emoji();
  assert.ok(aliceEmoji && bobEmoji, "both sides show emoji");
  assert.deepEqual(names(aliceEmoji), names(bobEmoji));
  assert.deepEqual(await alice.machine.sasDecimals(flowId), [...sas.decimals()]);

  await bob.send(await sas.confirm());
  await alice.machine.confirmSas(flowId);
  await settleBoth(alice, bob);
  await assertVerified(alice, bob, sas, flowId);
});

/** Both sides create and upload cross-signing keys, then see each other's. */
async function crossSign(alice, bob) {
  const server = alice.server;
  const a = await alice.machine.bootstrapCrossSigning();
  server.handle(ALICE, "ALICE1", { method: "POST", path: "/keys/device_signing/upload", body: a.deviceSigningUpload });
  server.handle(ALICE, "ALICE1", { method: "POST", path: "/keys/signatures/upload", body: a.signaturesUpload });
  const b = await bob.machine.bootstrapCrossSigning(true);
  if (b.uploadKeysRequest) await bob.send([b.uploadKeysRequest]);
  server.handle(BOB, "BOB1", { method: "POST", path: "/keys/device_signing/upload", body: b.uploadSigningKeysRequest.body });
  await bob.send([b.uploadSignaturesRequest]);
  await settleBoth(alice, bob);
}

test("SAS to-device with cross-signing on both sides: each verifies the other's identity", async () => {
  const { alice, bob } = await pair();
  await crossSign(alice, bob);
  assert.equal(await alice.machine.ownIdentityState(), "Verified");
  assert.ok((await bob.machine.crossSigningStatus()).hasMaster);
  const bobIdentity = await bob.machine.getIdentity(new UserId(ALICE));
  assert.ok(bobIdentity, "crypto-wasm sees newt's cross-signing identity");
  assert.equal(bobIdentity.isVerified(), false);
  const bobMaster = JSON.parse((await bob.machine.getIdentity(new UserId(BOB))).masterKey);
  assert.equal(await alice.machine.masterKey(BOB), Object.values(bobMaster.keys)[0]);
  assert.equal(await alice.machine.userIdentityState(BOB), "Pinned");
  assert.equal(await alice.machine.deviceTrust(BOB, "BOB1"), "CrossSignedByPinnedOwner");

  const { flowId, request } = await alice.machine.requestVerification(BOB, "BOB1");
  await alice.send([request]);
  await bob.settle();
  await bob.send([bob.machine.getVerificationRequest(new UserId(ALICE), flowId).accept()]);
  await alice.settle();
  await alice.machine.startSas(flowId);
  await alice.settle();
  await bob.settle();
  const sas = bob.machine.getVerification(new UserId(ALICE), flowId);
  await bob.send([sas.accept()]);
  await settleBoth(alice, bob);
  assert.deepEqual(names(await alice.machine.sasEmoji(flowId)), names(sas.emoji()));
  await alice.machine.confirmSas(flowId);
  await bob.send(await sas.confirm());
  await settleBoth(alice, bob, 4);
  await assertVerified(alice, bob, sas, flowId);

  assert.equal(await alice.machine.userIdentityState(BOB), "Verified", "newt verified crypto-wasm's identity");
  const identity = await bob.machine.getIdentity(new UserId(ALICE));
  assert.ok(identity.isVerified(), "crypto-wasm verified newt's identity");
  const aliceDevice = await bob.getDevice(ALICE, "ALICE1");
  assert.ok(aliceDevice.isCrossSigningTrusted(), "crypto-wasm trusts newt's device through cross-signing");
});

/** Two devices of one user, one newt and one crypto-wasm, each verified by the other locally. */
async function ownDevices(server, newt, cw) {
  await newt.settle();
  await cw.settle();
  cw.machine.roomKeyRequestsEnabled = true;
  cw.machine.roomKeyForwardingEnabled = true;
  await newt.track([ALICE]);
  await cw.track([ALICE]);
  await settleBoth(newt, cw);
  await newt.machine.setLocalTrust(ALICE, cw.device, "Verified");
  await (await cw.getDevice(ALICE, newt.machine.deviceId)).setLocalTrust(LocalTrust.Verified);
}

/** crypto-wasm's new device asks newt's device for a key it missed; `olm` makes an Olm session first. */
async function cwAsksNewt({ olm }) {
  const server = new Server();
  const newt = await NewtClient.open(server, ALICE, "ALICE1");
  await newt.settle();
  const event = await newt.shareAndSend(ROOM, [ALICE], "before the new device");
  const cw = await CryptoWasmClient.open(server, ALICE, "ALICE2");
  await ownDevices(server, newt, cw);
  if (olm) {
    const claim = await newt.machine.getMissingSessions([ALICE]);
    assert.ok(claim, "newt claims a key of the new device");
    await newt.send([claim]);
  }

  const err = await cw.decrypt(ROOM, event).then(() => null, (e) => e);
  assert.ok(err, "crypto-wasm has no key yet");
  await cw.settle(); // sends m.room_key_request (once per session)
  const processed = [];
  for (let i = 0; i < 3; i++) {
    processed.push(...await newt.settle());
    await cw.settle();
    await cw.decrypt(ROOM, event).catch(() => {}); // a client retries decryption
  }
  // With a session newt answers at once; without one it claims a key for the
  // device and answers once the session exists.
  const outcome = olm ? "KeyRequestAnswered" : "KeyRequestWaiting";
  assert.ok(processed.some((p) => p.type === "m.room_key_request" && p.outcome === outcome),
    `newt answered: ${JSON.stringify(processed)}`);
  const d = await cw.decrypt(ROOM, event);
  assert.equal(d.event.content.body, "before the new device");
  assert.equal(d.sender, ALICE);
}

test("room key request: crypto-wasm asks its own newt device (Olm session exists), newt forwards the key", () =>
  cwAsksNewt({ olm: true }));

// matrix-sdk-crypto asks once per session, so newt must not drop a request
// from a device it has no Olm session with: it keeps it waiting, claims a
// one-time key of the device, and answers once the session exists.
test("room key request: crypto-wasm asks its own newt device (no Olm session yet), newt claims and forwards",
  () => cwAsksNewt({ olm: false }));

test("room key request: newt asks its own crypto-wasm device, crypto-wasm forwards the key", async () => {
  const server = new Server();
  const cw = await CryptoWasmClient.open(server, ALICE, "ALICE2");
  await cw.settle();
  const event = await cw.shareAndSend(ROOM, [ALICE], "before the new device");
  const newt = await NewtClient.open(server, ALICE, "ALICE1");
  await ownDevices(server, newt, cw);

  await assert.rejects(newt.machine.decryptRoomEvent(ROOM, event), { code: "MissingSession" });
  await newt.machine.requestRoomKey(ROOM, event);
  await newt.settle();
  await cw.settle(); // answers with m.forwarded_room_key
  const processed = await newt.settle();
  assert.ok(processed.some((p) => p.type === "m.forwarded_room_key" && p.outcome === "RoomKeyStored"),
    `newt stored the forwarded key: ${JSON.stringify(processed)}`);
  const m = await newt.machine.decryptRoomEvent(ROOM, event);
  assert.equal(m.content.body, "before the new device");
  assert.equal(m.sender, ALICE);
});
