//! `newt-cli demo`: end-to-end encryption between three devices, in one process.
//!
//! Alice has two devices, Bob one; they talk through an in-process router
//! that stands in for a homeserver. Run with `cargo run -p newt-cli -- demo`.
//!
//! Each device keeps its state in an encrypted SQLite database (in a fresh
//! temporary directory, or under `--store DIR`); `--memory` uses the
//! in-memory store instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use newt::{ImportOptions, RoomId, RoomSettings, UserId};
use newt_router::Router;
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{MemoryStore, Store};
use newt_test_support::{SimDevice, SimError};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!("usage: newt-cli demo [--store DIR | --memory]");
        ExitCode::from(2)
    };
    if args.first().map(String::as_str) != Some("demo") {
        return usage();
    }
    let stores = match args.get(1).map(String::as_str) {
        None => Stores::Sqlite { dir: temp_dir(), keep: false },
        Some("--memory") => Stores::Memory,
        Some("--store") => match args.get(2) {
            Some(dir) => Stores::Sqlite { dir: PathBuf::from(dir), keep: true },
            None => return usage(),
        },
        Some(_) => return usage(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(demo(&stores));
    if let Stores::Sqlite { dir, keep: false } = &stores {
        let _ = std::fs::remove_dir_all(dir);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the devices keep their state.
enum Stores {
    Memory,
    Sqlite { dir: PathBuf, keep: bool },
}

impl Stores {
    fn describe(&self) -> String {
        match self {
            Stores::Memory => "in-memory".to_owned(),
            Stores::Sqlite { dir, .. } => format!("encrypted SQLite under {}", dir.display()),
        }
    }

    /// Opens the store of one device. The demo uses a raw 32-byte key (as a
    /// platform keychain would hold); `StoreKey::Passphrase` works the same.
    fn open(&self, device: &str) -> Result<Arc<dyn Store>, SimError> {
        match self {
            Stores::Memory => Ok(Arc::new(MemoryStore::new())),
            Stores::Sqlite { dir, .. } => {
                std::fs::create_dir_all(dir).map_err(|e| SimError::Io(e.to_string()))?;
                let key = StoreKey::Raw([7u8; 32]);
                let store = SqliteStore::open(dir.join(format!("{device}.sqlite")), key)
                    .map_err(|e| SimError::Newt(e.into()))?;
                Ok(Arc::new(store))
            }
        }
    }
}

fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("newt-demo-{}-{nanos}", std::process::id()))
}

fn step(text: &str) {
    println!("\n== {text}");
}

async fn demo(stores: &Stores) -> Result<(), SimError> {
    let router = Arc::new(Router::new());
    let room = RoomId::parse("!demo:example.org")?;
    let alice_id = UserId::parse("@alice:example.org")?;
    let bob_id = UserId::parse("@bob:example.org")?;
    let members = [alice_id.clone(), bob_id.clone()];
    let settings = RoomSettings::default();
    println!("newt demo: store = {}", stores.describe());

    step("Devices come online and upload their keys");
    let alice1 =
        SimDevice::open(router.clone(), "@alice:example.org", "ALICE1", stores.open("ALICE1")?)
            .await?;
    let alice2 =
        SimDevice::open(router.clone(), "@alice:example.org", "ALICE2", stores.open("ALICE2")?)
            .await?;
    let bob =
        SimDevice::open(router.clone(), "@bob:example.org", "BOB1", stores.open("BOB1")?).await?;
    for d in [&alice1, &alice2, &bob] {
        let n = d.flush().await?;
        let keys = d.machine.identity_keys().await;
        let (curve, ed) = (keys.curve25519, keys.ed25519);
        println!(
            "  {} {}: {n} requests sent; curve25519 {}…, ed25519 {}…",
            d.user,
            d.device,
            &curve[..8],
            &ed[..8]
        );
    }

    step("Everyone joins the room and tracks its members' devices");
    for d in [&alice1, &alice2, &bob] {
        d.sync().await?;
        d.machine.update_tracked_users(members.iter().cloned()).await?;
        d.flush().await?;
    }

    step("Alice (ALICE1) shares a room key with every device in the room");
    let sent = alice1.share_room_key(&room, &members, &settings).await?;
    println!("  {sent} to-device request(s) carrying the Megolm key over fresh Olm sessions");
    for d in [&alice2, &bob] {
        let out = d.sync().await?;
        for t in &out.to_device {
            println!("  {} {} received {} ({:?})", d.user, d.device, t.event_type, t.outcome);
        }
    }

    step("Alice sends an encrypted message; every device decrypts it");
    let event = alice1.send_text(&room, "Hello from newt!").await?;
    println!(
        "  ciphertext: {}…",
        &event["content"]["ciphertext"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(40)
            .collect::<String>()
    );
    for d in [&alice1, &alice2, &bob] {
        let plain = d.decrypt(&room, &event).await?;
        println!(
            "  {} {} reads {:?} (sender trust: {:?})",
            d.user, d.device, plain.content["body"], plain.trust
        );
    }

    step("Bob adds a new device later: it gets the next key, not the old one");
    let bob2 =
        SimDevice::open(router.clone(), "@bob:example.org", "BOB2", stores.open("BOB2")?).await?;
    bob2.flush().await?;
    alice1.sync().await?; // learns about BOB2 from device_lists.changed
    alice1.machine.discard_room_key(&room).await?; // a new device: start a fresh session
    alice1.share_room_key(&room, &members, &settings).await?;
    bob2.sync().await?;
    match bob2.decrypt(&room, &event).await {
        Ok(_) => println!("  unexpected: BOB2 decrypted a message from before it existed"),
        Err(e) => println!("  BOB2 cannot read the old message: {e}"),
    }
    let later = alice1.send_text(&room, "Welcome, BOB2").await?;
    let plain = bob2.decrypt(&room, &later).await?;
    println!("  BOB2 reads the new message: {:?}", plain.content["body"]);

    step("Bob exports his room keys; BOB2 imports them and reads the history");
    let file = bob.machine.export_room_keys("correct horse battery staple", 10_000, None).await?;
    println!(
        "  export file: {} bytes, starts {:?}",
        file.len(),
        file.lines().next().unwrap_or_default()
    );
    let summary = bob2
        .machine
        .import_room_keys(
            &file,
            "correct horse battery staple",
            &ImportOptions::default(),
            Some(&|done: u64, total: u64| {
                if done == total {
                    println!("  import progress: {done}/{total}");
                }
            }),
        )
        .await?;
    println!(
        "  imported {} of {} keys ({} skipped)",
        summary.imported, summary.total, summary.skipped
    );
    let plain = bob2.decrypt(&room, &event).await?;
    println!(
        "  BOB2 now reads the old message: {:?} (trust: {:?})",
        plain.content["body"], plain.trust
    );

    step("ALICE1 and ALICE2 verify each other by comparing emoji (SAS over to-device)");
    alice2.share_room_key(&room, &members, &settings).await?;
    alice1.sync().await?;
    let from_alice2 = alice2.send_text(&room, "Hi, it's my other device").await?;
    let before = alice1.decrypt(&room, &from_alice2).await?;
    println!("  ALICE1 reads {:?} from ALICE2: trust {:?}", before.content["body"], before.trust);
    verify_with_emoji(&alice1, &alice2).await?;
    let after = alice1.decrypt(&room, &from_alice2).await?;
    println!("  ALICE1 reads {:?} from ALICE2: trust {:?}", after.content["body"], after.trust);

    println!("\nDemo finished: all devices exchanged end-to-end encrypted messages.");
    Ok(())
}

/// `a` asks `b` (same user) to verify; both show the emoji; both confirm.
async fn verify_with_emoji(a: &SimDevice, b: &SimDevice) -> Result<(), SimError> {
    let (flow, request) = a.machine.request_verification(&b.user, &b.device).await?;
    a.send(&request).await?;
    b.sync().await?;
    b.machine.accept_verification(&flow).await?;
    b.flush().await?;
    a.sync().await?;
    a.machine.start_sas(&flow).await?;
    a.flush().await?;
    for _ in 0..2 {
        b.sync().await?; // start -> accept, then key -> key
        a.sync().await?; // accept -> key, then key
    }
    for d in [a, b] {
        let shown = d
            .machine
            .sas_emoji(&flow)
            .await
            .map(|e| {
                e.iter().map(|e| format!("{} {}", e.symbol, e.description)).collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let numbers = d.machine.sas_decimals(&flow).await.unwrap_or_default();
        println!("  {} sees: {} | {numbers:?}", d.device, shown.join(", "));
    }
    println!("  the users compare the emoji and both press \"They match\"");
    a.machine.confirm_sas(&flow).await?;
    a.flush().await?;
    b.machine.confirm_sas(&flow).await?;
    b.flush().await?;
    for _ in 0..2 {
        a.sync().await?;
        b.sync().await?;
    }
    for d in [a, b] {
        println!("  {}: {:?}", d.device, d.machine.verification_state(&flow).await);
    }
    Ok(())
}
