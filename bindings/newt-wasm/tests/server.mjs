// A small stand-in for the parts of a homeserver that end-to-end encryption
// uses, in plain JavaScript, so that JS clients (newt-wasm and
// @matrix-org/matrix-sdk-crypto-wasm) meet on the wire format:
// /keys/upload, /keys/query, /keys/claim, /keys/device_signing/upload,
// /keys/signatures/upload, /sendToDevice and the crypto fields of /sync.
// One-time keys are handed out once each, then the fallback key; key
// changes are announced to every other device; to-device messages are
// queued per device and delivered once. It checks no signatures.

export class Server {
  constructor() {
    this.deviceKeys = new Map(); // "user|device" -> keys
    this.oneTimeKeys = new Map(); // "user|device" -> [[id, key]]
    this.fallbackKeys = new Map(); // "user|device" -> [id, key]
    this.inbox = new Map(); // "user|device" -> events
    this.changed = new Map(); // "user|device" -> Set(user)
    this.crossSigning = new Map(); // user -> {master, self_signing, user_signing}
    this.rooms = new Map(); // roomId -> events
    this.nextEvent = 0;
  }

  /** Answers `request` ({method, path, body}) made by `user`'s `device`. */
  handle(user, device, request) {
    const body = typeof request.body === "string" ? JSON.parse(request.body) : request.body;
    const me = `${user}|${device}`;
    const path = request.path.replace(/^\/_matrix\/client\/v3/, "");
    if (path === "/keys/upload") return this.upload(me, user, body);
    if (path === "/keys/query") return this.query(user, body);
    if (path === "/keys/claim") return this.claim(body);
    if (path === "/keys/device_signing/upload") return this.deviceSigningUpload(user, body);
    if (path === "/keys/signatures/upload") return this.signaturesUpload(user, body);
    let m = path.match(/^\/sendToDevice\/([^/]+)\/([^/]+)$/);
    if (m) return this.sendToDevice(user, decodeURIComponent(m[1]), body);
    m = path.match(/^\/rooms\/([^/]+)\/send\/([^/]+)\/([^/]+)$/);
    if (m) return { event_id: this.sendRoomEvent(user, decodeURIComponent(m[1]), decodeURIComponent(m[2]), body) };
    throw new Error(`unknown endpoint ${request.method} ${request.path}`);
  }

  upload(me, user, body) {
    if (body.device_keys) {
      const old = this.deviceKeys.get(me);
      const keys = structuredClone(body.device_keys);
      if (old && JSON.stringify(old.keys) === JSON.stringify(keys.keys)) {
        for (const [signer, sigs] of Object.entries(old.signatures ?? {})) {
          keys.signatures[signer] = { ...sigs, ...(keys.signatures[signer] ?? {}) };
        }
      }
      const isNew = JSON.stringify(old) !== JSON.stringify(keys);
      this.deviceKeys.set(me, keys);
      if (isNew) this.announce(user, me);
    }
    const queue = this.oneTimeKeys.get(me) ?? [];
    for (const [id, key] of Object.entries(body.one_time_keys ?? {})) queue.push([id, key]);
    this.oneTimeKeys.set(me, queue);
    const fallback = Object.entries(body.fallback_keys ?? {})[0];
    if (fallback) this.fallbackKeys.set(me, fallback);
    return { one_time_key_counts: { signed_curve25519: queue.length } };
  }

  /** Tells every device (but `except`) that `user`'s keys changed. */
  announce(user, except) {
    for (const d of this.deviceKeys.keys()) {
      if (d === except) continue;
      if (!this.changed.has(d)) this.changed.set(d, new Set());
      this.changed.get(d).add(user);
    }
  }

  query(requester, body) {
    const out = { device_keys: {}, master_keys: {}, self_signing_keys: {}, user_signing_keys: {}, failures: {} };
    for (const [user, wanted] of Object.entries(body.device_keys ?? {})) {
      const devices = {};
      for (const [key, keys] of this.deviceKeys) {
        const [u, d] = key.split("|");
        if (u === user && (wanted.length === 0 || wanted.includes(d))) devices[d] = keys;
      }
      out.device_keys[user] = devices;
      const cs = this.crossSigning.get(user);
      if (cs?.master) {
        const master = structuredClone(cs.master);
        for (const signer of Object.keys(master.signatures ?? {})) {
          if (signer !== user && signer !== requester) delete master.signatures[signer];
        }
        out.master_keys[user] = master;
      }
      if (cs?.self_signing) out.self_signing_keys[user] = cs.self_signing;
      if (cs?.user_signing && user === requester) out.user_signing_keys[user] = cs.user_signing;
    }
    return out;
  }

  claim(body) {
    const out = { one_time_keys: {}, failures: {} };
    for (const [user, devices] of Object.entries(body.one_time_keys ?? {})) {
      for (const device of Object.keys(devices)) {
        const me = `${user}|${device}`;
        const queue = this.oneTimeKeys.get(me) ?? [];
        const key = queue.shift() ?? this.fallbackKeys.get(me);
        if (!key) continue;
        out.one_time_keys[user] ??= {};
        out.one_time_keys[user][device] = { [key[0]]: key[1] };
      }
    }
    return out;
  }

  deviceSigningUpload(user, body) {
    const keys = this.crossSigning.get(user) ?? {};
    if (body.master_key) keys.master = body.master_key;
    if (body.self_signing_key) keys.self_signing = body.self_signing_key;
    if (body.user_signing_key) keys.user_signing = body.user_signing_key;
    this.crossSigning.set(user, keys);
    this.announce(user);
    return {};
  }

  signaturesUpload(signer, body) {
    for (const [user, perKey] of Object.entries(body)) {
      for (const [keyId, object] of Object.entries(perKey)) {
        const sigs = object.signatures?.[signer];
        if (!sigs) continue;
        let target = this.deviceKeys.get(`${user}|${keyId}`);
        if (!target) {
          const cs = this.crossSigning.get(user) ?? {};
          target = Object.values(cs).find((k) => Object.values(k.keys ?? {}).includes(keyId));
        }
        if (!target) continue;
        target.signatures ??= {};
        target.signatures[signer] = { ...(target.signatures[signer] ?? {}), ...sigs };
        this.announce(user);
      }
    }
    return { failures: {} };
  }

  sendToDevice(sender, type, body) {
    for (const [user, devices] of Object.entries(body.messages ?? {})) {
      for (const [device, content] of Object.entries(devices)) {
        const targets = device === "*"
          ? [...this.deviceKeys.keys()].filter((k) => k.startsWith(`${user}|`))
          : [`${user}|${device}`];
        for (const t of targets) {
          if (!this.inbox.has(t)) this.inbox.set(t, []);
          this.inbox.get(t).push({ type, sender, content });
        }
      }
    }
    return {};
  }

  sendRoomEvent(sender, roomId, type, content) {
    const event = {
      type, sender, content, room_id: roomId,
      event_id: `$event${this.nextEvent++}`,
      origin_server_ts: Date.now(),
    };
    if (!this.rooms.has(roomId)) this.rooms.set(roomId, []);
    this.rooms.get(roomId).push(event);
    return event.event_id;
  }

  roomEvents(roomId) {
    return this.rooms.get(roomId) ?? [];
  }

  /** The crypto parts of a /sync for `user`'s `device` (in newt-wasm's shape). */
  sync(user, device) {
    const me = `${user}|${device}`;
    const toDeviceEvents = this.inbox.get(me) ?? [];
    this.inbox.set(me, []);
    const changedUsers = [...(this.changed.get(me) ?? [])];
    this.changed.set(me, new Set());
    return {
      toDeviceEvents,
      changedUsers,
      leftUsers: [],
      oneTimeKeyCount: (this.oneTimeKeys.get(me) ?? []).length,
      unusedFallbackKeyTypes: this.fallbackKeys.has(me) ? ["signed_curve25519"] : [],
    };
  }
}
