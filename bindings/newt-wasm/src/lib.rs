//! newt for JavaScript and TypeScript, through wasm-bindgen.
//!
//! This crate is thin: each method turns JS values into newt's types, calls
//! one [`newt::Machine`] method and turns the result back. There is no
//! protocol here. Results are plain JS objects, typed in the generated
//! `.d.ts` by the TypeScript section below. The server's JSON (event
//! contents, request bodies) goes in as objects (or JSON strings) and comes
//! out as objects, except request bodies, which come out as the JSON text
//! to send.
//!
//! Every failure rejects with a JS `Error` named `NewtError` whose `code`
//! is [`newt::ErrorKind`]'s name (or `InvalidArgument` for a JS value of
//! the wrong shape); a missing room key also carries the sender's
//! `withheldCode` and `withheldReason` when one arrived.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use js_sys::{Array, Function, Promise, Reflect, Uint8Array};
use newt_store_crypto::StoreKey;
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;

use newt::{
    DecryptedRoomEvent, Device, DeviceId, Emoji, ImportOptions, LocalTrust, MegolmError,
    OutgoingRequest, ProcessedToDevice, RequestKind, RoomId, RoomSettings, RotationSettings,
    SharingPolicy, SyncChanges, ToDeviceOutcome, UserId, VerificationFlow, VerificationState,
};

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &str = r#"
/** The `code` of a {@link NewtError}: `ErrorKind` of the Rust crate, or `InvalidArgument`. */
export type ErrorCode =
  | "WrongKey" | "StoreTooNew" | "StaleGeneration" | "StoreCorrupt" | "StoreBackend"
  | "AccountMismatch" | "InvalidId" | "MissingSession" | "UnknownIndex" | "Replay"
  | "DecryptionFailed" | "KeyExport" | "BadResponse" | "UnknownRequest" | "NoOutboundSession"
  | "CrossSigning" | "NoIdentity" | "UnknownDevice" | "UnknownFlow" | "VerificationState"
  | "VerificationViolation" | "Internal" | "InvalidArgument"
  /** newt panicked (a bug): this and every later call fail; reload the module. */
  | "Panic";

/** What every newt promise rejects with. */
export interface NewtError extends Error {
  name: "NewtError";
  code: ErrorCode;
  /** For `MissingSession`: the sender's withheld code (e.g. `m.unverified`), if one arrived. */
  withheldCode?: string;
  /** For `MissingSession`: the sender's withheld reason, if any. */
  withheldReason?: string;
}

/** A request to send to the homeserver, then report with `markRequestSent`. */
export interface OutgoingRequest {
  /** Pass back to `markRequestSent`. */
  id: string;
  type: "KeysUpload" | "KeysQuery" | "KeysClaim" | "SignaturesUpload" | "ToDevice" | "RoomMessage";
  method: "POST" | "PUT";
  /** Under `/_matrix/client/v3`, already percent-encoded. */
  path: string;
  /** The JSON body, as text. */
  body: string;
}

/** The end-to-end encryption parts of a `/sync` response. */
export interface SyncChanges {
  /** `to_device.events`. */
  toDeviceEvents?: object[];
  /** `device_lists.changed`. */
  changedUsers?: string[];
  /** `device_lists.left`. */
  leftUsers?: string[];
  /** `device_one_time_keys_count.signed_curve25519`; omit when the map is absent. */
  oneTimeKeyCount?: number;
  /** `device_unused_fallback_key_types`, if the server sent it. */
  unusedFallbackKeyTypes?: string[];
  /** `next_batch`. */
  nextBatch?: string;
}

/** What newt did with one to-device event. */
export interface ProcessedToDevice {
  sender: string;
  /** The (inner) event type. */
  type: string;
  /** The (decrypted) content; `null` when rejected. Room keys come without `session_key`. */
  content: any;
  encrypted: boolean;
  senderDevice?: string;
  /** Curve25519 key the Olm channel authenticated. */
  senderKey?: string;
  senderDeviceTrust?: DeviceTrust;
  outcome: "ForApp" | "RoomKeyStored" | "KeyRequestAnswered" | "KeyRequestWaiting" | "WithheldStored" | "Handled" | "Rejected";
  /** For `Rejected`: why. */
  error?: string;
}

export type SenderTrust = "Verified" | "Unverified" | "UnknownDevice" | "DeletedDevice" | "Unauthenticated";
export type DeviceTrust =
  | "Blacklisted" | "LocallyVerified" | "CrossSignedByVerifiedOwner" | "CrossSignedByPinnedOwner"
  | "CrossSignedByUntrustedOwner" | "NotCrossSigned" | "Unknown";
export type IdentityTrust = "Verified" | "Pinned" | "PinnedChanged" | "VerificationViolation";
export type OwnIdentityTrust = "Verified" | "Unverified";
export type LocalTrust = "Unset" | "Verified" | "Blacklisted";
export type SharingPolicy = "AllDevices" | "ExcludeBlacklisted" | "CrossSignedOnly" | "VerifiedOnly";

/** A decrypted room event. */
export interface DecryptedEvent {
  type: string;
  content: any;
  sender: string;
  senderDevice?: string;
  trust: SenderTrust;
  messageIndex: number;
  sessionId: string;
}

/** One result of `decryptRoomEvents`: the event, or the error for it. */
export type DecryptResult = { event: DecryptedEvent } | { error: NewtError };

/** Room settings for sharing and encrypting (all optional). */
export interface RoomSettings {
  policy?: SharingPolicy;
  sharedHistory?: boolean;
  blockOnVerificationViolation?: boolean;
  rotationPeriodMs?: number;
  rotationPeriodMsgs?: number;
}

export interface Device {
  userId: string;
  deviceId: string;
  curve25519: string;
  ed25519: string;
  displayName?: string;
  algorithms: string[];
  localTrust: LocalTrust;
}

export interface IdentityKeys { curve25519: string; ed25519: string }

export interface Emoji { number: number; symbol: string; description: string }

export type VerificationState =
  | { state: "Requested" | "RequestReceived" | "Ready" | "Started" | "KeysExchanged" | "QrScanned" | "Confirmed" | "Done" }
  | { state: "Cancelled"; code: string; byUs: boolean };

export interface VerificationFlow {
  flowId: string;
  otherUser: string;
  otherDevice?: string;
  roomId?: string;
  state: VerificationState;
}

/** A verification request to send: the flow's ID and the request. */
export interface VerificationRequest { flowId: string; request: OutgoingRequest }

export interface BootstrapRequests {
  /** `POST /keys/device_signing/upload` body (behind user-interactive auth). */
  deviceSigningUpload: object;
  /** `POST /keys/signatures/upload` body. */
  signaturesUpload: object;
}

export interface ImportSummary { total: number; imported: number; skipped: number }

/**
 * Where `Machine.open` keeps the device's state: an IndexedDB database
 * `name`, encrypted at rest under a passphrase (Argon2id, about a second per
 * open) or a raw 32-byte key (e.g. from `crypto.getRandomValues`, kept by the
 * app). Open one database from one `Machine` per tab; `deleteStore(name)`
 * removes it (sign-out).
 */
export type StoreOptions =
  | { name: string; passphrase: string; key?: undefined }
  | { name: string; key: Uint8Array; passphrase?: undefined };

/** Options of `Machine.open`. */
export interface OpenOptions {
  /** Absent: an in-memory store (nothing survives a reload). */
  store?: StoreOptions;
}

/** Progress of a long operation: `done` of `total` (total 0 when unknown). */
export type Progress = (done: number, total: number) => void;
"#;

/// A newt device: its keys, sessions and verification flows, on a store.
#[wasm_bindgen]
pub struct Machine {
    inner: newt::Machine,
}

#[wasm_bindgen]
impl Machine {
    /// Opens the device `deviceId` of `userId`, creating its account on
    /// first use. Without `options.store` the store is in memory (nothing
    /// survives a reload); with it, the IndexedDB database
    /// `options.store.name`, encrypted at rest under the passphrase (Argon2id:
    /// about a second per open) or the raw 32-byte key. A wrong passphrase
    /// or key rejects with `WrongKey` and writes nothing.
    #[wasm_bindgen(unchecked_return_type = "Promise<Machine>")]
    pub fn open(
        #[wasm_bindgen(js_name = userId)] user_id: String,
        #[wasm_bindgen(js_name = deviceId)] device_id: String,
        #[wasm_bindgen(unchecked_optional_param_type = "OpenOptions")] options: Option<JsValue>,
    ) -> Promise {
        let store = store_option(&options.unwrap_or(JsValue::UNDEFINED));
        run(async move {
            let user = user_id_of(&user_id)?;
            let device = device_id_of(&device_id)?;
            let store = open_store(store?).await?;
            let inner = newt::Machine::open(store, user, device).await.map_err(error)?;
            Ok(Machine { inner }.into())
        })
    }

    /// Our user ID.
    #[wasm_bindgen(getter, js_name = userId)]
    pub fn user_id(&self) -> String {
        self.inner.user_id().to_string()
    }

    /// Our device ID.
    #[wasm_bindgen(getter, js_name = deviceId)]
    pub fn device_id(&self) -> String {
        self.inner.device_id().to_string()
    }

    /// This device's identity keys (unpadded base64).
    #[wasm_bindgen(js_name = identityKeys, unchecked_return_type = "Promise<IdentityKeys>")]
    pub fn identity_keys(&self) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let k = m.identity_keys().await;
            to_js(&json!({"curve25519": k.curve25519, "ed25519": k.ed25519}))
        })
    }

    /// Feeds the end-to-end encryption parts of a `/sync` response; returns
    /// what happened to each to-device event.
    #[wasm_bindgen(js_name = receiveSync, unchecked_return_type = "Promise<ProcessedToDevice[]>")]
    pub fn receive_sync(
        &self,
        #[wasm_bindgen(unchecked_param_type = "SyncChanges")] changes: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let changes = sync_changes(&from_js(&changes)?)?;
            let outcome = m.receive_sync(changes).await.map_err(error)?;
            let list: Vec<Value> = outcome.to_device.iter().map(processed_to_device).collect();
            to_js(&Value::Array(list))
        })
    }

    /// Adds users whose devices we track (e.g. the members of encrypted rooms).
    #[wasm_bindgen(js_name = updateTrackedUsers, unchecked_return_type = "Promise<void>")]
    pub fn update_tracked_users(&self, users: Vec<String>) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let users = user_ids(&users)?;
            m.update_tracked_users(users).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The requests to send now; report each with `markRequestSent`.
    #[wasm_bindgen(js_name = outgoingRequests, unchecked_return_type = "Promise<OutgoingRequest[]>")]
    pub fn outgoing_requests(&self) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let requests = m.outgoing_requests().await.map_err(error)?;
            to_js(&Value::Array(requests.iter().map(request).collect()))
        })
    }

    /// Reports that request `id` was sent and the server answered
    /// `response` (an object or its JSON text).
    #[wasm_bindgen(js_name = markRequestSent, unchecked_return_type = "Promise<void>")]
    pub fn mark_request_sent(
        &self,
        id: String,
        #[wasm_bindgen(unchecked_param_type = "object | string")] response: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let response = from_js(&response)?;
            m.mark_request_sent(&id, &response).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// A `/keys/claim` request for the devices of `users` we have no Olm
    /// session with, if any.
    #[wasm_bindgen(js_name = getMissingSessions, unchecked_return_type = "Promise<OutgoingRequest | undefined>")]
    pub fn get_missing_sessions(&self, users: Vec<String>) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let users = user_ids(&users)?;
            match m.get_missing_sessions(users).await.map_err(error)? {
                Some(r) => to_js(&request(&r)),
                None => Ok(JsValue::UNDEFINED),
            }
        })
    }

    /// Shares the room key of `roomId` with the devices of `members`; returns
    /// the to-device requests to send.
    #[wasm_bindgen(js_name = shareRoomKey, unchecked_return_type = "Promise<OutgoingRequest[]>")]
    pub fn share_room_key(
        &self,
        #[wasm_bindgen(js_name = roomId)] room_id: String,
        members: Vec<String>,
        #[wasm_bindgen(unchecked_param_type = "RoomSettings | undefined")] settings: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let room = room_id_of(&room_id)?;
            let members = user_ids(&members)?;
            let settings = room_settings(&settings)?;
            let requests = m.share_room_key(&room, members, &settings).await.map_err(error)?;
            to_js(&Value::Array(requests.iter().map(request).collect()))
        })
    }

    /// Encrypts an event for `roomId`; returns the `m.room.encrypted` content.
    #[wasm_bindgen(js_name = encryptRoomEvent, unchecked_return_type = "Promise<object>")]
    pub fn encrypt_room_event(
        &self,
        #[wasm_bindgen(js_name = roomId)] room_id: String,
        #[wasm_bindgen(js_name = eventType)] event_type: String,
        #[wasm_bindgen(unchecked_param_type = "object | string")] content: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let room = room_id_of(&room_id)?;
            let content = from_js(&content)?;
            let encrypted =
                m.encrypt_room_event(&room, &event_type, content).await.map_err(error)?;
            to_js(&encrypted)
        })
    }

    /// Forgets the room's outbound session: the next share starts a new one.
    #[wasm_bindgen(js_name = discardRoomKey, unchecked_return_type = "Promise<void>")]
    pub fn discard_room_key(&self, #[wasm_bindgen(js_name = roomId)] room_id: String) -> Promise {
        let m = self.inner.clone();
        run(async move {
            m.discard_room_key(&room_id_of(&room_id)?).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Decrypts an `m.room.encrypted` event (the whole event).
    #[wasm_bindgen(js_name = decryptRoomEvent, unchecked_return_type = "Promise<DecryptedEvent>")]
    pub fn decrypt_room_event(
        &self,
        #[wasm_bindgen(js_name = roomId)] room_id: String,
        #[wasm_bindgen(unchecked_param_type = "object | string")] event: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let room = room_id_of(&room_id)?;
            let event = from_js(&event)?;
            let decrypted = m.decrypt_room_event(&room, &event).await.map_err(error)?;
            to_js(&decrypted_event(&decrypted))
        })
    }

    /// Decrypts several events of one room (a timeline page): one result
    /// per event, in order. Rejects only when the store fails.
    #[wasm_bindgen(js_name = decryptRoomEvents, unchecked_return_type = "Promise<DecryptResult[]>")]
    pub fn decrypt_room_events(
        &self,
        #[wasm_bindgen(js_name = roomId)] room_id: String,
        #[wasm_bindgen(unchecked_param_type = "object[]")] events: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let room = room_id_of(&room_id)?;
            let Value::Array(events) = from_js(&events)? else {
                return Err(invalid("events must be an array"));
            };
            let results = m.decrypt_room_events(&room, &events).await.map_err(error)?;
            let out = Array::new();
            for r in results {
                let item = js_sys::Object::new();
                match r {
                    Ok(d) => set(&item, "event", &to_js(&decrypted_event(&d))?),
                    Err(e) => set(&item, "error", &error(e)),
                }
                out.push(&item);
            }
            Ok(out.into())
        })
    }

    /// Asks our other devices for the key of an undecryptable event.
    #[wasm_bindgen(js_name = requestRoomKey, unchecked_return_type = "Promise<void>")]
    pub fn request_room_key(
        &self,
        #[wasm_bindgen(js_name = roomId)] room_id: String,
        #[wasm_bindgen(unchecked_param_type = "object | string")] event: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let room = room_id_of(&room_id)?;
            m.request_room_key(&room, &from_js(&event)?).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The known devices of `userId`.
    #[wasm_bindgen(unchecked_return_type = "Promise<Device[]>")]
    pub fn devices(&self, #[wasm_bindgen(js_name = userId)] user_id: String) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let devices = m.devices(&user_id_of(&user_id)?).await.map_err(error)?;
            to_js(&Value::Array(devices.iter().map(device).collect()))
        })
    }

    /// Sets the user's decision about a device.
    #[wasm_bindgen(js_name = setLocalTrust, unchecked_return_type = "Promise<void>")]
    pub fn set_local_trust(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
        #[wasm_bindgen(js_name = deviceId)] device_id: String,
        #[wasm_bindgen(unchecked_param_type = "LocalTrust")] trust: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let trust = match trust.as_str() {
                "Unset" => LocalTrust::Unset,
                "Verified" => LocalTrust::Verified,
                "Blacklisted" => LocalTrust::Blacklisted,
                _ => return Err(invalid("trust must be Unset, Verified or Blacklisted")),
            };
            let (user, device) = (user_id_of(&user_id)?, device_id_of(&device_id)?);
            m.set_local_trust(&user, &device, trust).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// This device's verdict on a device; `undefined` if unknown.
    #[wasm_bindgen(js_name = deviceTrust, unchecked_return_type = "Promise<DeviceTrust | undefined>")]
    pub fn device_trust(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
        #[wasm_bindgen(js_name = deviceId)] device_id: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let (user, device) = (user_id_of(&user_id)?, device_id_of(&device_id)?);
            let trust = m.device_trust(&user, &device).await.map_err(error)?;
            Ok(trust.map_or(JsValue::UNDEFINED, |t| name(&t).into()))
        })
    }

    /// Creates our cross-signing keys; returns the two bodies to upload.
    #[wasm_bindgen(js_name = bootstrapCrossSigning, unchecked_return_type = "Promise<BootstrapRequests>")]
    pub fn bootstrap_cross_signing(&self) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let r = m.bootstrap_cross_signing().await.map_err(error)?;
            to_js(&json!({
                "deviceSigningUpload": r.device_signing_upload,
                "signaturesUpload": r.signatures_upload,
            }))
        })
    }

    /// Our own identity's state; `undefined` without cross-signing.
    #[wasm_bindgen(js_name = ownIdentityState, unchecked_return_type = "Promise<OwnIdentityTrust | undefined>")]
    pub fn own_identity_state(&self) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let t = m.own_identity_state().await.map_err(error)?;
            Ok(t.map_or(JsValue::UNDEFINED, |t| name(&t).into()))
        })
    }

    /// Our view of a user's identity; `undefined` when none is known.
    #[wasm_bindgen(js_name = userIdentityState, unchecked_return_type = "Promise<IdentityTrust | undefined>")]
    pub fn user_identity_state(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let t = m.user_identity_state(&user_id_of(&user_id)?).await.map_err(error)?;
            Ok(t.map_or(JsValue::UNDEFINED, |t| name(&t).into()))
        })
    }

    /// A user's stored master key (unpadded base64), to compare out of band.
    #[wasm_bindgen(js_name = masterKey, unchecked_return_type = "Promise<string | undefined>")]
    pub fn master_key(&self, #[wasm_bindgen(js_name = userId)] user_id: String) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let k = m.master_key(&user_id_of(&user_id)?).await.map_err(error)?;
            Ok(k.map_or(JsValue::UNDEFINED, JsValue::from))
        })
    }

    /// Signs a user's master key after the user compared it; returns the
    /// `/keys/signatures/upload` body.
    #[wasm_bindgen(js_name = verifyUserIdentity, unchecked_return_type = "Promise<object>")]
    pub fn verify_user_identity(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
        #[wasm_bindgen(js_name = expectedMasterKey)] expected_master_key: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let user = user_id_of(&user_id)?;
            to_js(&m.verify_user_identity(&user, &expected_master_key).await.map_err(error)?)
        })
    }

    /// Accepts a user's changed identity.
    #[wasm_bindgen(js_name = acknowledgeIdentityChange, unchecked_return_type = "Promise<void>")]
    pub fn acknowledge_identity_change(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            m.acknowledge_identity_change(&user_id_of(&user_id)?).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Asks `deviceId` of `userId` to verify; returns the flow and request.
    #[wasm_bindgen(js_name = requestVerification, unchecked_return_type = "Promise<VerificationRequest>")]
    pub fn request_verification(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
        #[wasm_bindgen(js_name = deviceId)] device_id: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let (user, device) = (user_id_of(&user_id)?, device_id_of(&device_id)?);
            let (flow, r) = m.request_verification(&user, &device).await.map_err(error)?;
            to_js(&json!({"flowId": flow, "request": request(&r)}))
        })
    }

    /// Asks all our other devices to verify this one.
    #[wasm_bindgen(js_name = requestOwnVerification, unchecked_return_type = "Promise<VerificationRequest>")]
    pub fn request_own_verification(&self) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let (flow, r) = m.request_own_verification().await.map_err(error)?;
            to_js(&json!({"flowId": flow, "request": request(&r)}))
        })
    }

    /// The content of an in-room `m.key.verification.request` to `userId`.
    #[wasm_bindgen(js_name = roomVerificationRequestContent, unchecked_return_type = "Promise<object>")]
    pub fn room_verification_request_content(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(
            async move { to_js(&m.room_verification_request_content(&user_id_of(&user_id)?).await) },
        )
    }

    /// The in-room request was sent as `eventId`: the flow starts.
    #[wasm_bindgen(js_name = roomVerificationRequestSent, unchecked_return_type = "Promise<void>")]
    pub fn room_verification_request_sent(
        &self,
        #[wasm_bindgen(js_name = roomId)] room_id: String,
        #[wasm_bindgen(js_name = eventId)] event_id: String,
        #[wasm_bindgen(js_name = userId)] user_id: String,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let (room, user) = (room_id_of(&room_id)?, user_id_of(&user_id)?);
            m.room_verification_request_sent(&room, &event_id, &user).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Feeds an in-room verification event (decrypted or as received).
    #[wasm_bindgen(js_name = receiveRoomVerificationEvent, unchecked_return_type = "Promise<void>")]
    pub fn receive_room_verification_event(
        &self,
        #[wasm_bindgen(js_name = roomId)] room_id: String,
        #[wasm_bindgen(unchecked_param_type = "object | string")] event: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let room = room_id_of(&room_id)?;
            m.receive_room_verification_event(&room, &from_js(&event)?).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Accepts a verification request we received.
    #[wasm_bindgen(js_name = acceptVerification, unchecked_return_type = "Promise<void>")]
    pub fn accept_verification(
        &self,
        #[wasm_bindgen(js_name = flowId)] flow_id: String,
    ) -> Promise {
        self.flow_step(flow_id, Step::Accept)
    }

    /// Starts SAS in a ready flow.
    #[wasm_bindgen(js_name = startSas, unchecked_return_type = "Promise<void>")]
    pub fn start_sas(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        self.flow_step(flow_id, Step::StartSas)
    }

    /// The user saw the same emoji or numbers on both devices.
    #[wasm_bindgen(js_name = confirmSas, unchecked_return_type = "Promise<void>")]
    pub fn confirm_sas(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        self.flow_step(flow_id, Step::ConfirmSas)
    }

    /// The emoji or numbers differ: cancels the flow.
    #[wasm_bindgen(js_name = sasMismatch, unchecked_return_type = "Promise<void>")]
    pub fn sas_mismatch(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        self.flow_step(flow_id, Step::SasMismatch)
    }

    /// Cancels a flow.
    #[wasm_bindgen(js_name = cancelVerification, unchecked_return_type = "Promise<void>")]
    pub fn cancel_verification(
        &self,
        #[wasm_bindgen(js_name = flowId)] flow_id: String,
    ) -> Promise {
        self.flow_step(flow_id, Step::Cancel)
    }

    /// The other side scanned our QR code (the user confirms it).
    #[wasm_bindgen(js_name = confirmQrScanned, unchecked_return_type = "Promise<void>")]
    pub fn confirm_qr_scanned(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        self.flow_step(flow_id, Step::ConfirmQrScanned)
    }

    /// The seven SAS emoji, once keys are exchanged.
    #[wasm_bindgen(js_name = sasEmoji, unchecked_return_type = "Promise<Emoji[] | undefined>")]
    pub fn sas_emoji(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        let m = self.inner.clone();
        run(async move {
            match m.sas_emoji(&flow_id).await {
                Some(list) => to_js(&Value::Array(list.iter().map(emoji).collect())),
                None => Ok(JsValue::UNDEFINED),
            }
        })
    }

    /// The three SAS numbers, once keys are exchanged.
    #[wasm_bindgen(js_name = sasDecimals, unchecked_return_type = "Promise<number[] | undefined>")]
    pub fn sas_decimals(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        let m = self.inner.clone();
        run(async move {
            match m.sas_decimals(&flow_id).await {
                Some(d) => to_js(&json!(d)),
                None => Ok(JsValue::UNDEFINED),
            }
        })
    }

    /// The QR code payload to show, when the flow allows one.
    #[wasm_bindgen(js_name = qrCode, unchecked_return_type = "Promise<Uint8Array | undefined>")]
    pub fn qr_code(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let bytes = m.qr_code(&flow_id).await.map_err(error)?;
            Ok(bytes.map_or(JsValue::UNDEFINED, |b| Uint8Array::from(b.as_slice()).into()))
        })
    }

    /// The payload of the other side's QR code, as scanned.
    #[wasm_bindgen(js_name = scanQrCode, unchecked_return_type = "Promise<void>")]
    pub fn scan_qr_code(
        &self,
        #[wasm_bindgen(js_name = flowId)] flow_id: String,
        bytes: Vec<u8>,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            m.scan_qr_code(&flow_id, &bytes).await.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// A flow's state; `undefined` for an unknown flow.
    #[wasm_bindgen(js_name = verificationState, unchecked_return_type = "Promise<VerificationState | undefined>")]
    pub fn verification_state(&self, #[wasm_bindgen(js_name = flowId)] flow_id: String) -> Promise {
        let m = self.inner.clone();
        run(async move {
            match m.verification_state(&flow_id).await {
                Some(s) => to_js(&verification_state(&s)),
                None => Ok(JsValue::UNDEFINED),
            }
        })
    }

    /// Every flow this device knows (they live in memory only).
    #[wasm_bindgen(js_name = verificationFlows, unchecked_return_type = "Promise<VerificationFlow[]>")]
    pub fn verification_flows(&self) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let flows = m.verification_flows().await;
            to_js(&Value::Array(flows.iter().map(verification_flow).collect()))
        })
    }

    /// Exports every room key as a passphrase-encrypted file (text).
    /// `rounds` of PBKDF2 (at least 100,000 for real files).
    #[wasm_bindgen(js_name = exportRoomKeys, unchecked_return_type = "Promise<string>")]
    pub fn export_room_keys(
        &self,
        passphrase: String,
        rounds: u32,
        #[wasm_bindgen(unchecked_param_type = "Progress | undefined")] progress: JsValue,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let progress = JsProgress::of(progress);
            let text = m
                .export_room_keys(&passphrase, rounds, progress.as_ref().map(|p| p as _))
                .await
                .map_err(error)?;
            Ok(text.into())
        })
    }

    /// Imports a room key export file; `maxRounds` caps the PBKDF2 rounds a
    /// file may ask for (default 5,000,000).
    #[wasm_bindgen(js_name = importRoomKeys, unchecked_return_type = "Promise<ImportSummary>")]
    pub fn import_room_keys(
        &self,
        file: String,
        passphrase: String,
        #[wasm_bindgen(unchecked_param_type = "Progress | undefined")] progress: JsValue,
        #[wasm_bindgen(js_name = maxRounds)] max_rounds: Option<u32>,
    ) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let progress = JsProgress::of(progress);
            let mut options = ImportOptions::default();
            if let Some(max) = max_rounds {
                options.max_rounds = max;
            }
            let summary = m
                .import_room_keys(&file, &passphrase, &options, progress.as_ref().map(|p| p as _))
                .await
                .map_err(error)?;
            to_js(&json!({
                "total": summary.total,
                "imported": summary.imported,
                "skipped": summary.skipped,
            }))
        })
    }
}

/// Deletes the IndexedDB database `name` of a store (sign-out). Connections
/// still open on it (this page's or another tab's) close first; a machine
/// that used it fails with `StoreBackend` afterwards.
#[wasm_bindgen(js_name = deleteStore, unchecked_return_type = "Promise<void>")]
pub fn delete_store(name: String) -> Promise {
    run(async move {
        #[cfg(target_arch = "wasm32")]
        {
            newt_indexeddb::delete_store(&name).await.map_err(store_error)?;
            Ok(JsValue::UNDEFINED)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = name;
            Err(no_indexeddb())
        }
    })
}

/// `options.store` of [`Machine::open`]: the database name and its key.
struct StoreOption {
    name: String,
    key: StoreKey,
}

/// Reads `options.store` (read before the call starts, as JS values do not
/// cross into the future).
fn store_option(options: &JsValue) -> Result<Option<StoreOption>, JsValue> {
    let field = |object: &JsValue, key: &str| -> Result<JsValue, JsValue> {
        if object.is_undefined() || object.is_null() {
            return Ok(JsValue::UNDEFINED);
        }
        if !object.is_object() {
            return Err(invalid("open options and options.store must be objects"));
        }
        Reflect::get(object, &key.into()).map_err(|_| invalid("unreadable open options"))
    };
    let store = field(options, "store")?;
    if store.is_undefined() || store.is_null() {
        return Ok(None);
    }
    let name =
        field(&store, "name")?.as_string().ok_or_else(|| invalid("store.name must be a string"))?;
    let passphrase = field(&store, "passphrase")?;
    let key = field(&store, "key")?;
    let key = match (passphrase.as_string(), key.dyn_into::<Uint8Array>()) {
        (Some(p), Err(_)) => StoreKey::Passphrase(p),
        (None, Ok(k)) if k.length() == 32 => {
            let mut raw = [0u8; 32];
            k.copy_to(&mut raw);
            StoreKey::Raw(raw)
        }
        (None, Ok(_)) => return Err(invalid("store.key must be 32 bytes")),
        _ => {
            return Err(invalid(
                "store needs exactly one of passphrase (a string) or key (a Uint8Array)",
            ))
        }
    };
    Ok(Some(StoreOption { name, key }))
}

/// The store for `option`: IndexedDB when given, else memory.
async fn open_store(
    option: Option<StoreOption>,
) -> Result<std::sync::Arc<dyn newt::Store>, JsValue> {
    let Some(option) = option else {
        return Ok(std::sync::Arc::new(newt::MemoryStore::new()));
    };
    #[cfg(target_arch = "wasm32")]
    {
        let store = newt_indexeddb::IndexedDbStore::open(&option.name, option.key)
            .await
            .map_err(store_error)?;
        #[allow(clippy::arc_with_non_send_sync)]
        Ok(std::sync::Arc::new(store))
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (option.name, option.key);
        Err(no_indexeddb())
    }
}

#[cfg(target_arch = "wasm32")]
fn store_error(e: newt::StoreError) -> JsValue {
    error(newt::Error::Store(e))
}

#[cfg(not(target_arch = "wasm32"))]
fn no_indexeddb() -> JsValue {
    error(newt::Error::Store(newt::StoreError::Backend("IndexedDB exists on wasm32 only".into())))
}

/// The verification steps that take only a flow ID.
enum Step {
    Accept,
    StartSas,
    ConfirmSas,
    SasMismatch,
    Cancel,
    ConfirmQrScanned,
}

impl Machine {
    fn flow_step(&self, flow_id: String, step: Step) -> Promise {
        let m = self.inner.clone();
        run(async move {
            let result = match step {
                Step::Accept => m.accept_verification(&flow_id).await,
                Step::StartSas => m.start_sas(&flow_id).await,
                Step::ConfirmSas => m.confirm_sas(&flow_id).await,
                Step::SasMismatch => m.sas_mismatch(&flow_id).await,
                Step::Cancel => m.cancel_verification(&flow_id).await,
                Step::ConfirmQrScanned => m.confirm_qr_scanned(&flow_id).await,
            };
            result.map_err(error)?;
            Ok(JsValue::UNDEFINED)
        })
    }
}

thread_local! {
    /// The reject functions of the promises whose futures are running, so
    /// that a panic can settle them (see [`start`]).
    static IN_FLIGHT: RefCell<BTreeMap<u64, Function>> = const { RefCell::new(BTreeMap::new()) };
    static NEXT_CALL: Cell<u64> = const { Cell::new(0) };
    /// Set by the first panic: every later call rejects with it.
    static PANICKED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs once when the module is instantiated: installs the panic hook.
///
/// A panic should never happen (every bad input is a typed error), but if
/// one does, the module cannot go on safely (the wasm instance traps). The
/// hook rejects every pending promise with a `NewtError` of code `Panic`
/// carrying the message, and every later call rejects with the same error
/// at once instead of running in a broken instance. Reload the module (or
/// the page) to start again.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string();
        let pending = IN_FLIGHT.with(|f| f.try_borrow_mut().map(|mut f| std::mem::take(&mut *f)));
        PANICKED.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                p.get_or_insert_with(|| message.clone());
            }
        });
        for reject in pending.into_iter().flat_map(BTreeMap::into_values) {
            let _ = reject.call1(&JsValue::NULL, &panic_error(&message));
        }
    }));
}

fn panic_error(message: &str) -> JsValue {
    new_error("Panic", &format!("newt panicked and must be reloaded: {message}")).into()
}

/// The promise of `future`, which runs on the JS event loop; see [`start`]
/// for what happens if it panics.
fn run<F>(future: F) -> Promise
where
    F: std::future::Future<Output = Result<JsValue, JsValue>> + 'static,
{
    if let Some(message) = PANICKED.with(|p| p.try_borrow().ok().and_then(|p| p.clone())) {
        return Promise::reject(&panic_error(&message));
    }
    let id = NEXT_CALL.with(|n| {
        let id = n.get();
        n.set(id.wrapping_add(1));
        id
    });
    let mut settle = None;
    let promise = Promise::new(&mut |resolve, reject| settle = Some((resolve, reject)));
    let Some((resolve, reject)) = settle else {
        return Promise::reject(&new_error("Internal", "promise executor not called").into());
    };
    IN_FLIGHT.with(|f| f.borrow_mut().insert(id, reject.clone()));
    wasm_bindgen_futures::spawn_local(async move {
        let result = future.await;
        IN_FLIGHT.with(|f| f.borrow_mut().remove(&id));
        let _ = match result {
            Ok(value) => resolve.call1(&JsValue::NULL, &value),
            Err(error) => reject.call1(&JsValue::NULL, &error),
        };
    });
    promise
}

/// Test hook (not in the typings): panics inside a running call, so the
/// tests can check what a panic does. Never call it in an app.
#[wasm_bindgen(js_name = __newtTestPanic, skip_typescript)]
pub fn test_panic() -> Promise {
    run(async {
        let empty: Vec<u8> = Vec::new();
        // An out-of-bounds index: a real panic, not a simulated one.
        let index = empty.len() + 1;
        Ok(JsValue::from(empty[index]))
    })
}

/// A JS progress callback `(done, total) => void` as newt's [`newt::Progress`].
struct JsProgress(Function);

impl JsProgress {
    fn of(value: JsValue) -> Option<Self> {
        value.dyn_into::<Function>().ok().map(Self)
    }
}

impl newt::Progress for JsProgress {
    fn progress(&self, done: u64, total: u64) {
        // A throwing callback does not stop the operation.
        let _ = self.0.call2(&JsValue::NULL, &(done as f64).into(), &(total as f64).into());
    }
}

// ---- errors ----

fn new_error(code: &str, message: &str) -> js_sys::Error {
    let e = js_sys::Error::new(message);
    e.set_name("NewtError");
    let _ = Reflect::set(&e, &"code".into(), &code.into());
    e
}

fn error(e: newt::Error) -> JsValue {
    let js = new_error(e.kind().as_str(), &e.to_string());
    if let newt::Error::Megolm(MegolmError::MissingSession { withheld: Some(w), .. }) = &e {
        let _ = Reflect::set(&js, &"withheldCode".into(), &w.code.as_str().into());
        if let Some(reason) = &w.reason {
            let _ = Reflect::set(&js, &"withheldReason".into(), &reason.as_str().into());
        }
    }
    js.into()
}

fn invalid(message: &str) -> JsValue {
    new_error("InvalidArgument", message).into()
}

// ---- JS <-> JSON ----

/// A JS object (or its JSON text) as JSON.
fn from_js(value: &JsValue) -> Result<Value, JsValue> {
    let text = match value.as_string() {
        Some(s) => s,
        None => js_sys::JSON::stringify(value)
            .ok()
            .and_then(|s| s.as_string())
            .ok_or_else(|| invalid("not a JSON value"))?,
    };
    serde_json::from_str(&text).map_err(|e| invalid(&format!("invalid JSON: {e}")))
}

fn to_js(value: &Value) -> Result<JsValue, JsValue> {
    js_sys::JSON::parse(&value.to_string())
}

/// `value` without its absent (`null`) fields, so that TypeScript's
/// optional fields are `undefined`, not `null`. `content` always stays.
fn compact(mut value: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.retain(|k, v| !v.is_null() || k == "content");
    }
    value
}

fn set(target: &js_sys::Object, key: &str, value: &JsValue) {
    let _ = Reflect::set(target, &key.into(), value);
}

/// The Rust name of a field-less enum variant (`SenderTrust::Verified` ->
/// `"Verified"`): the string values of the TypeScript types above.
fn name<T: std::fmt::Debug>(value: &T) -> String {
    format!("{value:?}")
}

fn user_id_of(s: &str) -> Result<UserId, JsValue> {
    UserId::parse(s).map_err(|e| error(e.into()))
}

fn device_id_of(s: &str) -> Result<DeviceId, JsValue> {
    DeviceId::parse(s).map_err(|e| error(e.into()))
}

fn room_id_of(s: &str) -> Result<RoomId, JsValue> {
    RoomId::parse(s).map_err(|e| error(e.into()))
}

fn user_ids(list: &[String]) -> Result<Vec<UserId>, JsValue> {
    list.iter().map(|u| user_id_of(u)).collect()
}

fn strings(value: Option<&Value>, what: &str) -> Result<Vec<String>, JsValue> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| invalid(what)))
            .collect(),
        Some(_) => Err(invalid(what)),
    }
}

fn sync_changes(v: &Value) -> Result<SyncChanges, JsValue> {
    let to_device_events = match v.get("toDeviceEvents") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(events)) => events.clone(),
        Some(_) => return Err(invalid("toDeviceEvents must be an array")),
    };
    let users = |key: &str| -> Result<Vec<UserId>, JsValue> {
        strings(v.get(key), "user ID lists must be arrays of strings")?
            .iter()
            .map(|u| user_id_of(u))
            .collect()
    };
    let one_time_key_count = match v.get("oneTimeKeyCount") {
        None | Some(Value::Null) => None,
        Some(n) => Some(n.as_u64().ok_or_else(|| invalid("oneTimeKeyCount must be a count"))?),
    };
    let unused_fallback_key_types = match v.get("unusedFallbackKeyTypes") {
        None | Some(Value::Null) => None,
        some => Some(strings(some, "unusedFallbackKeyTypes must be strings")?),
    };
    let next_batch = match v.get("nextBatch") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("nextBatch must be a string")),
    };
    Ok(SyncChanges {
        to_device_events,
        changed_users: users("changedUsers")?,
        left_users: users("leftUsers")?,
        one_time_key_count,
        unused_fallback_key_types,
        next_batch,
    })
}

fn room_settings(value: &JsValue) -> Result<RoomSettings, JsValue> {
    let mut settings = RoomSettings::default();
    if value.is_undefined() || value.is_null() {
        return Ok(settings);
    }
    let v = from_js(value)?;
    if let Some(p) = v.get("policy").and_then(Value::as_str) {
        settings.policy = match p {
            "AllDevices" => SharingPolicy::AllDevices,
            "ExcludeBlacklisted" => SharingPolicy::ExcludeBlacklisted,
            "CrossSignedOnly" => SharingPolicy::CrossSignedOnly,
            "VerifiedOnly" => SharingPolicy::VerifiedOnly,
            _ => return Err(invalid("unknown sharing policy")),
        };
    }
    if let Some(b) = v.get("sharedHistory").and_then(Value::as_bool) {
        settings.shared_history = b;
    }
    if let Some(b) = v.get("blockOnVerificationViolation").and_then(Value::as_bool) {
        settings.block_on_verification_violation = b;
    }
    let mut rotation = RotationSettings::default();
    if let Some(ms) = v.get("rotationPeriodMs").and_then(Value::as_u64) {
        rotation.rotation_period_ms = ms;
    }
    if let Some(n) = v.get("rotationPeriodMsgs").and_then(Value::as_u64) {
        rotation.rotation_period_msgs = n;
    }
    settings.rotation = rotation;
    Ok(settings)
}

// ---- newt -> JSON ----

fn request(r: &OutgoingRequest) -> Value {
    let kind = match &r.kind {
        RequestKind::KeysUpload { .. } => "KeysUpload",
        RequestKind::KeysQuery { .. } => "KeysQuery",
        RequestKind::KeysClaim { .. } => "KeysClaim",
        RequestKind::SignaturesUpload { .. } => "SignaturesUpload",
        RequestKind::ToDevice { .. } => "ToDevice",
        RequestKind::RoomMessage { .. } => "RoomMessage",
        _ => "Other",
    };
    json!({
        "id": r.id,
        "type": kind,
        "method": r.kind.method(),
        "path": r.kind.path(),
        "body": r.kind.body_string(),
    })
}

fn processed_to_device(p: &ProcessedToDevice) -> Value {
    let (outcome, error) = match &p.outcome {
        ToDeviceOutcome::ForApp => ("ForApp", None),
        ToDeviceOutcome::RoomKeyStored(..) => ("RoomKeyStored", None),
        ToDeviceOutcome::KeyRequestAnswered => ("KeyRequestAnswered", None),
        ToDeviceOutcome::KeyRequestWaiting => ("KeyRequestWaiting", None),
        ToDeviceOutcome::WithheldStored => ("WithheldStored", None),
        ToDeviceOutcome::Rejected(e) => ("Rejected", Some(e.to_string())),
        _ => ("Handled", None),
    };
    compact(json!({
        "sender": p.sender,
        "type": p.event_type,
        "content": p.content,
        "encrypted": p.encrypted,
        "senderDevice": p.sender_device.as_ref().map(ToString::to_string),
        "senderKey": p.sender_key,
        "senderDeviceTrust": p.sender_device_trust.as_ref().map(name),
        "outcome": outcome,
        "error": error,
    }))
}

fn decrypted_event(d: &DecryptedRoomEvent) -> Value {
    compact(json!({
        "type": d.event_type,
        "content": d.content,
        "sender": d.sender.to_string(),
        "senderDevice": d.sender_device.as_ref().map(ToString::to_string),
        "trust": name(&d.trust),
        "messageIndex": d.message_index,
        "sessionId": d.session_id,
    }))
}

fn device(d: &Device) -> Value {
    compact(json!({
        "userId": d.user_id.to_string(),
        "deviceId": d.device_id.to_string(),
        "curve25519": d.curve25519,
        "ed25519": d.ed25519,
        "displayName": d.display_name,
        "algorithms": d.algorithms,
        "localTrust": name(&d.local_trust),
    }))
}

fn emoji(e: &Emoji) -> Value {
    json!({"number": e.number, "symbol": e.symbol, "description": e.description})
}

fn verification_state(s: &VerificationState) -> Value {
    match s {
        VerificationState::Cancelled { code, by_us } => {
            json!({"state": "Cancelled", "code": code.as_str(), "byUs": by_us})
        }
        other => json!({"state": name(other)}),
    }
}

fn verification_flow(f: &VerificationFlow) -> Value {
    compact(json!({
        "flowId": f.flow_id,
        "otherUser": f.other_user.to_string(),
        "otherDevice": f.other_device.as_ref().map(ToString::to_string),
        "roomId": f.room_id.as_ref().map(ToString::to_string),
        "state": verification_state(&f.state),
    }))
}
