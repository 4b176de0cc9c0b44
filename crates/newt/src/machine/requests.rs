//! Outgoing requests: what to send now (key upload, device queries, key
//! requests, queued messages) and the dispatch of their answers.

use std::collections::BTreeSet;

use serde_json::Value;

use newt_proto::account::SIGNED_CURVE25519;
use newt_proto::changes::Changes;
use newt_proto::devices::keys_query_body;
use newt_proto::ids::{DeviceId, UserId};
use newt_proto::key_requests::request_content;
use newt_proto::sharing::{KeyDelivery, WithheldDelivery};
use newt_store::StoreError;

use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

use super::{to_device_request, Machine, State};

pub(super) enum Pending {
    KeysUpload,
    KeysQuery(BTreeSet<UserId>),
    KeysClaim(Vec<(UserId, DeviceId)>),
    /// One to-device chunk of a room key share; `batch` names the share.
    RoomKeyShare {
        batch: String,
        devices: Vec<KeyDelivery>,
        withheld: Vec<WithheldDelivery>,
    },
    KeyRequest(String),
    Other,
}

impl Machine {
    /// The requests to send now: key upload, device queries, queued
    /// to-device messages, key requests, and a `/keys/claim` for our
    /// devices whose key requests wait for an Olm session
    /// ([`ToDeviceOutcome::KeyRequestWaiting`](crate::ToDeviceOutcome::KeyRequestWaiting);
    /// answered once the claim's answer is reported). Each must be reported with
    /// [`mark_request_sent`](Self::mark_request_sent).
    pub async fn outgoing_requests(&self) -> Result<Vec<OutgoingRequest>, Error> {
        let mut st = self.inner.state.lock().await;
        self.refresh_account(&mut st).await?;
        let mut out = Vec::new();
        self.poll_verification_timeouts(&mut st, self.now()).await?;
        let upload_in_flight = st.in_flight.values().any(|p| matches!(p, Pending::KeysUpload));
        let now = self.now();
        if !upload_in_flight && !st.account.upload_leased(now) {
            if let Some(body) = st.account.keys_upload_body() {
                // Take the upload lease in the store first: if another process
                // sharing the store took it (or changed the account), the
                // commit fails with StaleGeneration and we do not upload.
                st.account.take_upload_lease(now);
                match self.commit(&mut st, Changes::default(), true).await {
                    Ok(()) => {
                        let id = st.next_id();
                        st.in_flight.insert(id.clone(), Pending::KeysUpload);
                        out.push(OutgoingRequest { id, kind: RequestKind::KeysUpload { body } });
                    }
                    Err(Error::Store(StoreError::StaleGeneration { .. })) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let outdated: BTreeSet<UserId> = self
            .store()
            .tracked_users()
            .await?
            .into_iter()
            .filter(|t| t.outdated && !st.queries_in_flight.contains(&t.user_id))
            .map(|t| t.user_id)
            .collect();
        if !outdated.is_empty() {
            let id = st.next_id();
            st.queries_in_flight.extend(outdated.iter().cloned());
            out.push(OutgoingRequest {
                id: id.clone(),
                kind: RequestKind::KeysQuery { body: keys_query_body(&outdated) },
            });
            st.in_flight.insert(id, Pending::KeysQuery(outdated));
        }
        // Key requests not yet sent (and not in flight), to all our own
        // devices. They are marked sent only when the caller reports success.
        for request in self.store().unsent_key_requests().await? {
            let in_flight = st
                .in_flight
                .values()
                .any(|p| matches!(p, Pending::KeyRequest(id) if *id == request.request_id));
            if in_flight {
                continue;
            }
            let content = request_content(&self.inner.device_id, &request, None, false);
            let id = st.next_id();
            st.in_flight.insert(id.clone(), Pending::KeyRequest(request.request_id.clone()));
            out.push(to_device_request(
                id,
                "m.room_key_request",
                [(self.inner.user_id.clone(), "*".to_owned(), content)],
            ));
        }
        // Key requests waiting for an Olm session: answered, or a claim.
        if let Some(claim) = self.serve_waiting_key_requests(&mut st).await? {
            out.push(claim);
        }
        for r in std::mem::take(&mut st.queued) {
            if !st.in_flight.contains_key(&r.id) {
                st.in_flight.insert(r.id.clone(), Pending::Other);
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Reports that request `id` was sent and the server answered `response`.
    pub async fn mark_request_sent(&self, id: &str, response: &Value) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let pending =
            st.in_flight.remove(id).ok_or_else(|| Error::UnknownRequest(id.to_owned()))?;
        match pending {
            Pending::KeysUpload => self.handle_upload_response(&mut st, response).await,
            Pending::KeysQuery(users) => self.handle_query_response(&mut st, users, response).await,
            Pending::KeysClaim(requested) => {
                self.handle_claim_response(&mut st, &requested, response).await
            }
            Pending::RoomKeyShare { batch, devices, withheld } => {
                self.share_chunk_sent(&mut st, &batch, devices, withheld).await
            }
            Pending::KeyRequest(request_id) => self.key_request_sent(&mut st, &request_id).await,
            Pending::Other => Ok(()),
        }
    }

    /// The `/keys/upload` answer: the one-time key count the server now holds.
    async fn handle_upload_response(&self, st: &mut State, response: &Value) -> Result<(), Error> {
        let count = response
            .get("one_time_key_counts")
            .and_then(|c| c.get(SIGNED_CURVE25519))
            .and_then(Value::as_u64);
        if response.get("one_time_key_counts").is_none() {
            return Err(Error::BadResponse("keys/upload: one_time_key_counts"));
        }
        st.account.mark_keys_uploaded(Some(count.unwrap_or(0)), self.now());
        self.commit(st, Changes::default(), true).await
    }

    /// A key request reached our other devices: it is not sent again.
    async fn key_request_sent(&self, st: &mut State, request_id: &str) -> Result<(), Error> {
        let Some(mut request) = self.store().key_request(request_id).await? else {
            return Ok(()); // answered meanwhile
        };
        request.sent = true;
        let changes = Changes { key_requests: vec![request], ..Default::default() };
        self.commit(st, changes, false).await
    }
}
