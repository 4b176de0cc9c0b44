// A device run by @matrix-org/matrix-sdk-crypto-wasm (the reference JS
// stack) on the JS stand-in server: maps its typed request objects to
// server.handle() and the server's /sync crypto fields to
// receiveSyncChanges(). Memory store (no store name).
import {
  initAsync, OlmMachine, UserId, DeviceId, RoomId, DeviceLists, RequestType,
  DecryptionSettings, TrustRequirement, EncryptionSettings,
} from "@matrix-org/matrix-sdk-crypto-wasm";

await initAsync();

/** `{method, path}` of a crypto-wasm request, under /_matrix/client/v3. */
function route(r) {
  const e = encodeURIComponent;
  switch (r.type) {
    case RequestType.KeysUpload: return { method: "POST", path: "/keys/upload" };
    case RequestType.KeysQuery: return { method: "POST", path: "/keys/query" };
    case RequestType.KeysClaim: return { method: "POST", path: "/keys/claim" };
    case RequestType.SignatureUpload: return { method: "POST", path: "/keys/signatures/upload" };
    case RequestType.ToDevice: return { method: "PUT", path: `/sendToDevice/${e(r.event_type)}/${e(r.txn_id)}` };
    case RequestType.RoomMessage:
      return { method: "PUT", path: `/rooms/${e(r.room_id)}/send/${e(r.event_type)}/${e(r.txn_id)}` };
    default: throw new Error(`crypto-wasm request type ${r.type} not supported by the test server`);
  }
}

export class CryptoWasmClient {
  constructor(server, machine, user, device) {
    this.server = server;
    this.machine = machine;
    this.user = user;
    this.device = device;
  }

  static async open(server, user, device) {
    const machine = await OlmMachine.initialize(new UserId(user), new DeviceId(device));
    return new CryptoWasmClient(server, machine, user, device);
  }

  /** Sends crypto-wasm requests (any mix of its request classes) and marks them sent. */
  async send(requests) {
    for (const r of requests) {
      const response = this.server.handle(this.user, this.device, { ...route(r), body: r.body });
      // Requests made outside outgoingRequests() (verification steps) have
      // IDs the machine may not know; marking them is harmless.
      if (r.id !== undefined) await this.machine.markRequestAsSent(r.id, r.type, JSON.stringify(response));
    }
  }

  /** One /sync: feeds the server's crypto fields; returns the processed to-device events. */
  async sync() {
    const s = this.server.sync(this.user, this.device);
    const processed = await this.machine.receiveSyncChanges(
      JSON.stringify(s.toDeviceEvents),
      new DeviceLists(s.changedUsers.map((u) => new UserId(u)), s.leftUsers.map((u) => new UserId(u))),
      new Map([["signed_curve25519", s.oneTimeKeyCount]]),
      new Set(s.unusedFallbackKeyTypes),
    );
    return { processed, quiet: s.toDeviceEvents.length === 0 && s.changedUsers.length === 0 };
  }

  /** Syncs and sends every outgoing request until nothing is left; returns all processed events. */
  async settle() {
    const all = [];
    for (let i = 0; i < 5; i++) {
      const { processed, quiet } = await this.sync();
      all.push(...processed);
      const requests = await this.machine.outgoingRequests();
      await this.send(requests);
      if (requests.length === 0 && quiet) break;
    }
    return all;
  }

  async track(users) {
    await this.machine.updateTrackedUsers(users.map((u) => new UserId(u)));
    await this.settle();
  }

  /** Olm sessions with `members`, room key shared, event encrypted and sent: returns the room event. */
  async shareAndSend(roomId, members, text) {
    await this.track(members);
    // Arrays of UserId are moved into the wasm side: a fresh one per call.
    const users = () => members.map((u) => new UserId(u));
    const claim = await this.machine.getMissingSessions(users());
    if (claim) await this.send([claim]);
    await this.send(await this.machine.shareRoomKey(new RoomId(roomId), users(), new EncryptionSettings()));
    const content = await this.machine.encryptRoomEvent(
      new RoomId(roomId), "m.room.message", JSON.stringify({ msgtype: "m.text", body: text }));
    const eventId = this.server.sendRoomEvent(this.user, roomId, "m.room.encrypted", JSON.parse(content));
    return this.server.roomEvents(roomId).find((e) => e.event_id === eventId);
  }

  /** Decrypts a room event: `{sender, senderDevice, senderKey, claimedEd25519, event}`. */
  async decrypt(roomId, event) {
    const d = await this.machine.decryptRoomEvent(
      JSON.stringify(event), new RoomId(roomId), new DecryptionSettings(TrustRequirement.Untrusted));
    return {
      sender: d.sender.toString(),
      senderDevice: d.senderDevice?.toString(),
      senderKey: d.senderCurve25519Key,
      claimedEd25519: d.senderClaimedEd25519Key,
      event: JSON.parse(d.event),
    };
  }

  async getDevice(user, device) {
    return this.machine.getDevice(new UserId(user), new DeviceId(device));
  }
}
