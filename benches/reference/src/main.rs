//! The reference side of newt's benchmarks: the same workloads as
//! `newt-bench run`, on the same fixture files, with matrix-sdk-crypto 0.18
//! (its memory store, or matrix-sdk-sqlite 0.18's store).
//!
//! ```text
//! reference-bench run FIXTURES WORKLOAD STORE SAMPLES   # STORE: memory | sqlite
//! ```
//!
//! Requests and responses go through ruma's HTTP (de)serialisation, as in
//! `crates/newt-interop`: responses are parsed from their JSON bytes inside
//! the timing, as newt-bench parses them for newt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent;
use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::{
    decrypt_room_key_export, encrypt_room_key_export, CollectStrategy, DecryptionSettings,
    EncryptionSettings, OlmMachine, TrustRequirement,
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::api::client::keys::{claim_keys, get_keys, upload_keys};
use ruma::api::client::to_device::send_event_to_device;
use ruma::api::IncomingResponse;
use ruma::events::AnyMessageLikeEventContent;
use ruma::serde::Raw;
use ruma::{OneTimeKeyAlgorithm, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId};
use serde_json::{json, Value};

#[path = "../../newt-bench/src/lib.rs"]
#[allow(dead_code)]
mod common;
use common::*;

type Error = Box<dyn std::error::Error>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 5 || args[0] != "run" {
        eprintln!("usage: reference-bench run FIXTURES WORKLOAD memory|sqlite SAMPLES");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let samples: usize = args[4].parse().expect("SAMPLES");
    let fixtures = PathBuf::from(&args[1]);
    match rt.block_on(run(&fixtures, &args[2], &args[3], samples.max(1))) {
        Ok((samples, peak)) => {
            println!("{}", result_line("reference", &args[2], &args[3], &samples, peak))
        }
        Err(e) => {
            eprintln!("reference {} {}: {e}", args[2], args[3]);
            std::process::exit(1);
        }
    }
}

fn from_json<R: IncomingResponse>(bytes: &[u8]) -> Result<R, Error> {
    let response = http::Response::builder().status(200).body(bytes.to_vec())?;
    R::try_from_http_response(response).map_err(|e| format!("bad response: {e}").into())
}

fn own_user() -> OwnedUserId {
    <&UserId>::try_from(OWN_USER).expect("user id").to_owned()
}

async fn open_sqlite(dir: &Path) -> Result<SqliteCryptoStore, Error> {
    Ok(SqliteCryptoStore::open_with_key(dir.join("reference-store"), Some(&[7; 32])).await?)
}

async fn open(kind: &str, dir: &Path) -> Result<OlmMachine, Error> {
    let device: &ruma::DeviceId = OWN_DEVICE.into();
    let machine = match kind {
        "memory" => OlmMachine::new(&own_user(), device).await,
        "sqlite" => {
            OlmMachine::with_store(&own_user(), device, open_sqlite(dir).await?, None).await?
        }
        other => return Err(format!("unknown store {other}").into()),
    };
    warm_up(&machine).await?;
    Ok(machine)
}

/// Answers the first requests of a new device: the key upload and the query
/// of our own user (with our own device keys, as uploaded).
async fn warm_up(machine: &OlmMachine) -> Result<(), Error> {
    let mut own_keys = Value::Null;
    for r in machine.outgoing_requests().await? {
        if let AnyOutgoingRequest::KeysUpload(upload) = r.request() {
            if let Some(keys) = &upload.device_keys {
                own_keys = serde_json::from_str(keys.json().get())?;
            }
            let counts =
                BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, UInt::from(50u32))]);
            let response = upload_keys::v3::Response::new(counts);
            machine.mark_request_as_sent(r.request_id(), &response).await?;
        }
    }
    for r in machine.outgoing_requests().await? {
        if let AnyOutgoingRequest::KeysQuery(_) = r.request() {
            let body = json!({
                "device_keys": { OWN_USER: { OWN_DEVICE: own_keys.clone() } },
                "failures": {},
            });
            let response: get_keys::v3::Response = from_json(&serde_json::to_vec(&body)?)?;
            machine.mark_request_as_sent(r.request_id(), &response).await?;
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn users_in(file: &str) -> Result<Vec<OwnedUserId>, Error> {
    users_of(&serde_json::from_str(file)?)
        .iter()
        .map(|u| Ok(<&UserId>::try_from(u.as_str())?.to_owned()))
        .collect()
}

async fn keys_query(machine: &OlmMachine, users: &[OwnedUserId], file: &str) -> Result<(), Error> {
    machine.update_tracked_users(users.iter().map(|u| u.as_ref())).await?;
    let mut handled = false;
    for r in machine.outgoing_requests().await? {
        if let AnyOutgoingRequest::KeysQuery(q) = r.request() {
            std::hint::black_box(serde_json::to_vec(&q.device_keys)?);
            let response: get_keys::v3::Response = from_json(file.as_bytes())?;
            machine.mark_request_as_sent(r.request_id(), &response).await?;
            handled = true;
        }
    }
    if handled {
        Ok(())
    } else {
        Err("no keys/query request".into())
    }
}

async fn keys_claim(
    machine: &OlmMachine,
    users: &[OwnedUserId],
    file: &str,
) -> Result<Instant, Error> {
    let (id, _request) = machine
        .get_missing_sessions(users.iter().map(|u| u.as_ref()))
        .await?
        .ok_or("no keys/claim request")?;
    let start = Instant::now();
    let response: claim_keys::v3::Response = from_json(file.as_bytes())?;
    machine.mark_request_as_sent(&id, &response).await?;
    Ok(start)
}

async fn import(machine: &OlmMachine, file: &str) -> Result<usize, Error> {
    let keys = decrypt_room_key_export(std::io::Cursor::new(file.as_bytes()), PASSPHRASE)?;
    let result = machine.store().import_exported_room_keys(keys, |_, _| {}).await?;
    if result.imported_count != result.total_count {
        return Err(format!("imported {} of {}", result.imported_count, result.total_count).into());
    }
    Ok(result.imported_count)
}

fn settings() -> EncryptionSettings {
    EncryptionSettings {
        sharing_strategy: CollectStrategy::AllDevices,
        rotation_period: Duration::from_secs(10 * 365 * 24 * 3600),
        rotation_period_msgs: u64::MAX / 2,
        ..Default::default()
    }
}

fn untrusted() -> DecryptionSettings {
    DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted }
}

async fn decrypt(machine: &OlmMachine, room: &RoomId, event: &str) -> Result<(), Error> {
    let raw: Raw<EncryptedEvent> =
        Raw::from_json(serde_json::value::RawValue::from_string(event.to_owned())?);
    let decrypted = machine.decrypt_room_event(&raw, room, &untrusted()).await?;
    std::hint::black_box(decrypted);
    Ok(())
}

fn event_texts(fixtures: &Path) -> Result<Vec<String>, Error> {
    let events: Vec<Value> = serde_json::from_str(&read(&megolm_events_file(fixtures))?)?;
    Ok(events.iter().map(Value::to_string).collect())
}

async fn decrypt_setup(
    fixtures: &Path,
    store: &str,
    dir: &Path,
    devices: usize,
) -> Result<OlmMachine, Error> {
    let machine = open(store, dir).await?;
    let query = read(&query_file(fixtures, devices))?;
    keys_query(&machine, &users_in(&query)?, &query).await?;
    import(&machine, &read(&megolm_session_file(fixtures))?).await?;
    Ok(machine)
}

async fn device_count(machine: &OlmMachine, users: &[OwnedUserId]) -> Result<usize, Error> {
    let mut n = 0;
    for u in users {
        n += machine.get_user_devices(u, None).await?.devices().count();
    }
    Ok(n)
}

fn tempdir() -> Result<tempdir::Dir, Error> {
    tempdir::Dir::new()
}

/// A temporary directory on the work disk (`BENCH_TMPDIR`), removed on drop.
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Result<Self, super::Error> {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let base = std::env::var_os("BENCH_TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            let dir = base.join(format!(
                "reference-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir)?;
            Ok(Self(dir))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn run(
    fixtures: &Path,
    workload: &str,
    store: &str,
    samples: usize,
) -> Result<(Vec<u64>, Option<u64>), Error> {
    let (name, size) = workload.split_once('/').ok_or("name/size")?;
    let n: usize = size.parse()?;
    let mut out = Vec::with_capacity(samples);
    let room: OwnedRoomId = ROOM.try_into()?;
    match name {
        "keys_query" => {
            let file = read(&query_file(fixtures, n))?;
            let users = users_in(&file)?;
            for _ in 0..samples {
                let dir = tempdir()?;
                let machine = open(store, dir.path()).await?;
                let start = Instant::now();
                keys_query(&machine, &users, &file).await?;
                out.push(elapsed_ns(start));
                let count = device_count(&machine, &users).await?;
                if count != n {
                    return Err(format!("{count} devices stored, expected {n}").into());
                }
            }
        }
        "keys_claim" => {
            let query = read(&query_file(fixtures, n))?;
            let claim = read(&claim_file(fixtures, n))?;
            let users = users_in(&query)?;
            for _ in 0..samples {
                let dir = tempdir()?;
                let machine = open(store, dir.path()).await?;
                keys_query(&machine, &users, &query).await?;
                let start = keys_claim(&machine, &users, &claim).await?;
                out.push(elapsed_ns(start));
                if machine.get_missing_sessions(users.iter().map(|u| u.as_ref())).await?.is_some() {
                    return Err("devices left without a session".into());
                }
            }
        }
        "share" => {
            let query = read(&query_file(fixtures, n))?;
            let claim = read(&claim_file(fixtures, n))?;
            let users = users_in(&query)?;
            let dir = tempdir()?;
            let machine = open(store, dir.path()).await?;
            keys_query(&machine, &users, &query).await?;
            keys_claim(&machine, &users, &claim).await?;
            for i in 0..samples {
                let room: OwnedRoomId = format!("!share{i}:bench.test").try_into()?;
                let start = Instant::now();
                let requests = machine
                    .share_room_key(&room, users.iter().map(|u| u.as_ref()), settings())
                    .await?;
                let mut sent = 0;
                for r in &requests {
                    std::hint::black_box(serde_json::to_vec(&r.messages)?);
                    if r.event_type.to_string() == "m.room.encrypted" {
                        sent += r.message_count();
                    }
                    let response: send_event_to_device::v3::Response = from_json(b"{}")?;
                    machine.mark_request_as_sent(&r.txn_id, &response).await?;
                }
                out.push(elapsed_ns(start));
                if sent != n {
                    return Err(format!("room key sent to {sent} devices, expected {n}").into());
                }
            }
        }
        "missing_sessions" => {
            let query = read(&query_file(fixtures, n))?;
            let users = users_in(&query)?;
            for _ in 0..samples {
                let dir = tempdir()?;
                let machine = open(store, dir.path()).await?;
                keys_query(&machine, &users, &query).await?;
                let start = Instant::now();
                let (_, request) = machine
                    .get_missing_sessions(users.iter().map(|u| u.as_ref()))
                    .await?
                    .ok_or("no keys/claim request")?;
                let body = serde_json::to_vec(&request.one_time_keys)?;
                out.push(elapsed_ns(start));
                let claimed: usize = serde_json::from_slice::<Value>(&body)?
                    .as_object()
                    .map(|m| m.values().filter_map(Value::as_object).map(|d| d.len()).sum())
                    .unwrap_or(0);
                if claimed != n {
                    return Err(format!("claim for {claimed} devices, expected {n}").into());
                }
            }
        }
        "encrypt_one" => {
            let dir = tempdir()?;
            let machine = open(store, dir.path()).await?;
            machine.share_room_key(&room, std::iter::once(own_user().as_ref()), settings()).await?;
            for i in 0..samples {
                let content =
                    json!({ "msgtype": "m.text", "body": format!("benchmark message number {i}") });
                let start = Instant::now();
                // The caller's content, serialised as the reference takes it.
                let raw: Raw<AnyMessageLikeEventContent> =
                    Raw::from_json(serde_json::value::to_raw_value(&content)?);
                let encrypted =
                    machine.encrypt_room_event_raw(&room, "m.room.message", &raw).await?;
                out.push(elapsed_ns(start));
                std::hint::black_box(encrypted);
            }
        }
        "decrypt_one" => {
            let events = event_texts(fixtures)?;
            let dir = tempdir()?;
            let machine = decrypt_setup(fixtures, store, dir.path(), 150).await?;
            for i in 0..samples {
                let start = Instant::now();
                decrypt(&machine, &room, &events[i % events.len()]).await?;
                out.push(elapsed_ns(start));
            }
        }
        "decrypt_batch" => {
            let events = event_texts(fixtures)?;
            for _ in 0..samples {
                let dir = tempdir()?;
                let machine = decrypt_setup(fixtures, store, dir.path(), 150).await?;
                let start = Instant::now();
                for e in &events[..n] {
                    decrypt(&machine, &room, e).await?;
                }
                out.push(elapsed_ns(start));
            }
        }
        "import" => {
            let file = read(&export_file(fixtures, n))?;
            let mut peak = None;
            for _ in 0..samples {
                let dir = tempdir()?;
                let machine = open(store, dir.path()).await?;
                reset_peak_rss();
                let start = Instant::now();
                let imported = import(&machine, &file).await?;
                out.push(elapsed_ns(start));
                peak = peak.max(peak_rss_kib());
                if imported != n {
                    return Err(format!("imported {imported}, expected {n}").into());
                }
            }
            return Ok((out, peak));
        }
        "export" => {
            let file = read(&export_file(fixtures, n))?;
            let dir = tempdir()?;
            let machine = open(store, dir.path()).await?;
            import(&machine, &file).await?;
            drop(file);
            let mut peak = None;
            for _ in 0..samples {
                reset_peak_rss();
                let start = Instant::now();
                let keys = machine.store().export_room_keys(|_| true).await?;
                let export = encrypt_room_key_export(&keys, PASSPHRASE, EXPORT_ROUNDS)?;
                out.push(elapsed_ns(start));
                peak = peak.max(peak_rss_kib());
                if keys.len() != n {
                    return Err(format!("exported {}, expected {n}", keys.len()).into());
                }
                std::hint::black_box(export);
            }
            return Ok((out, peak));
        }
        "open_store" => {
            if store != "sqlite" {
                return Err("open_store measures a persistent store".into());
            }
            let events = event_texts(fixtures)?;
            let dir = tempdir()?;
            {
                let machine = decrypt_setup(fixtures, store, dir.path(), n / 10).await?;
                import(&machine, &read(&export_file(fixtures, n))?).await?;
            }
            let device: &ruma::DeviceId = OWN_DEVICE.into();
            for i in 0..samples {
                let start = Instant::now();
                let machine = OlmMachine::with_store(
                    &own_user(),
                    device,
                    open_sqlite(dir.path()).await?,
                    None,
                )
                .await?;
                decrypt(&machine, &room, &events[i % events.len()]).await?;
                out.push(elapsed_ns(start));
            }
        }
        other => return Err(format!("unknown workload {other}").into()),
    }
    Ok((out, None))
}
