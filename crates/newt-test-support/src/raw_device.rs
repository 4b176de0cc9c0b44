//! An attacker's device, built from newt-proto primitives.

use std::collections::BTreeMap;
use std::sync::Arc;

use newt_proto::account::OwnAccount;
use newt_proto::devices::parse_device_keys;
use newt_proto::ids::DeviceId;
use newt_proto::json::b64_encode;
use newt_proto::olm::{self, OlmSession};
use newt_proto::records::DeviceRecord;
use newt_router::Router;
use serde_json::{json, Value};

use crate::{uid, SimDevice};

/// An attacker device: a real account and real Olm, arbitrary plaintext.
pub struct RawDevice {
    /// Its account (keys it can sign and Olm-encrypt with).
    pub account: OwnAccount,
    /// Its device keys, as others would store them.
    pub record: DeviceRecord,
    /// The router it talks to.
    pub router: Arc<Router>,
}

impl RawDevice {
    /// A device whose keys were uploaded.
    pub fn new(router: &Arc<Router>, user: &str, device: &str) -> Self {
        let mut raw = Self::unpublished(router, user, device);
        let body = raw.account.keys_upload_body().unwrap();
        router.handle(user, device, "POST", "/keys/upload", &body).unwrap();
        raw.account.mark_keys_uploaded(Some(50), 0);
        raw
    }

    /// A device whose keys were never uploaded: nobody can know them, but it
    /// can still claim keys and send (the router checks no access token).
    pub fn unpublished(router: &Arc<Router>, user: &str, device: &str) -> Self {
        let mut account = OwnAccount::new(uid(user), DeviceId::parse(device).unwrap());
        account.prepare_initial_upload(0);
        let record = parse_device_keys(account.user_id(), device, &account.device_keys()).unwrap();
        Self { account, record, router: router.clone() }
    }

    /// `sender` is what the server puts on the event (a malicious server
    /// can put anyone).
    pub fn send_olm_plaintext(
        &self,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        plaintext: &Value,
        sender: &str,
    ) {
        let (mut session, _) = self.claim_session(target_keys);
        let message = session.session.encrypt(serde_json::to_vec(plaintext).unwrap()).unwrap();
        let (message_type, body) = message.to_parts();
        let content = json!({
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": self.record.curve25519,
            "ciphertext": {target_keys.curve25519.clone(): {"type": message_type, "body": b64_encode(body)}},
        });
        let body = json!({"messages": {target.user.as_str(): {target.device.as_str(): content}}});
        let path = "/sendToDevice/m.room.encrypted/raw";
        self.router.handle(sender, self.record.device_id.as_str(), "PUT", path, &body).unwrap();
    }

    /// Claims a one-time key of `target` and sends it an Olm event with an
    /// arbitrary inner type and content.
    pub fn send_olm(
        &self,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        event_type: &str,
        content: Value,
    ) {
        self.send_olm_as(target, target_keys, target_keys, event_type, content)
    }

    /// Like `send_olm`, but the plaintext names `recipient` as the recipient.
    pub fn send_olm_as(
        &self,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        recipient: &DeviceRecord,
        event_type: &str,
        content: Value,
    ) {
        let (mut session, _) = self.claim_session(target_keys);
        self.send_on(&mut session, target, target_keys, recipient, event_type, content);
    }

    /// Claims a key of the device `target_keys` (a one-time key while it has
    /// any, then its fallback key) and starts an Olm session on it. Returns
    /// the session and the signed key object that was claimed.
    pub fn claim_session(&self, target_keys: &DeviceRecord) -> (OlmSession, Value) {
        let (user, device) = (target_keys.user_id.as_str(), target_keys.device_id.as_str());
        let claim = json!({"one_time_keys": {user: {device: "signed_curve25519"}}});
        let resp = self
            .router
            .handle(
                self.account.user_id().as_str(),
                self.record.device_id.as_str(),
                "POST",
                "/keys/claim",
                &claim,
            )
            .unwrap();
        let claimed = resp["one_time_keys"][user][device].as_object().unwrap();
        let key = claimed.values().next().unwrap().clone();
        let devices = BTreeMap::from([(
            (target_keys.user_id.clone(), target_keys.device_id.clone()),
            target_keys.clone(),
        )]);
        let mut out = olm::handle_keys_claim(
            &self.account,
            &[(target_keys.user_id.clone(), target_keys.device_id.clone())],
            &devices,
            &resp,
            0,
        );
        (OlmSession::from_record(out.sessions.remove(0).2), key)
    }

    /// Olm-encrypts an event on `session` and sends it to `target`, naming
    /// `recipient` as the recipient in the plaintext.
    pub fn send_on(
        &self,
        session: &mut OlmSession,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        recipient: &DeviceRecord,
        event_type: &str,
        content: Value,
    ) {
        let mut encrypted =
            olm::encrypt(&self.account, session, recipient, event_type, content).unwrap();
        if recipient.curve25519 != target_keys.curve25519 {
            let ct = encrypted["ciphertext"].as_object_mut().unwrap();
            let v = ct.remove(&recipient.curve25519).unwrap();
            ct.insert(target_keys.curve25519.clone(), v);
        }
        self.send_raw(target, "m.room.encrypted", encrypted);
    }

    /// Sends `content` to `target` as a to-device event of `event_type`,
    /// as it is (plaintext unless it is already encrypted).
    pub fn send_raw(&self, target: &SimDevice, event_type: &str, content: Value) {
        let body = json!({"messages": {target.user.as_str(): {target.device.as_str(): content}}});
        self.router
            .handle(
                self.account.user_id().as_str(),
                self.record.device_id.as_str(),
                "PUT",
                &format!("/sendToDevice/{event_type}/x"),
                &body,
            )
            .unwrap();
    }
}
