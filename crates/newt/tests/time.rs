//! Rules that depend on time, driven by a `ManualClock`: the driver reads no
//! clock of its own, so a test moves time instead of waiting. (Unwedging at
//! most once an hour is in e2e.rs, `wedged_session_is_replaced_once_per_hour`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use newt_test_support::*;

use std::sync::Arc;

use newt::{CancelCode, Error, RoomId, RoomSettings, RotationSettings, VerificationState};
use newt_router::Router;

fn room() -> RoomId {
    RoomId::parse("!room:hs").unwrap()
}

/// An outbound session is used until its rotation period has passed, then
/// the next share starts a new one (and encrypting without it is refused).
#[tokio::test]
async fn outbound_session_rotates_by_age() {
    let router = Arc::new(Router::new());
    let clock = manual_clock();
    let a = timed_dev(&router, "@alice:hs", "A", &clock).await;
    let b = dev(&router, "@bob:hs", "B").await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    let hour = 60 * 60 * 1000;
    let settings = RoomSettings {
        rotation: RotationSettings { rotation_period_msgs: 100, rotation_period_ms: hour },
        ..Default::default()
    };
    a.share_room_key(&room(), &users, &settings).await.unwrap();
    let first = a.send_text(&room(), "first").await.unwrap();
    clock.advance(hour - 1);
    a.share_room_key(&room(), &users, &settings).await.unwrap();
    let second = a.send_text(&room(), "second").await.unwrap();
    assert_eq!(first["content"]["session_id"], second["content"]["session_id"]);

    clock.advance(1);
    assert!(matches!(
        a.send_text(&room(), "too late").await,
        Err(SimError::Newt(Error::NoOutboundSession(_)))
    ));
    a.share_room_key(&room(), &users, &settings).await.unwrap();
    let third = a.send_text(&room(), "third").await.unwrap();
    assert_ne!(first["content"]["session_id"], third["content"]["session_id"]);
    b.sync().await.unwrap();
    assert_eq!(b.decrypt(&room(), &third).await.unwrap().content["body"], "third");
}

/// A verification request nobody answers is cancelled with `m.timeout` ten
/// minutes after it was made, and the other side is told.
#[tokio::test]
async fn unanswered_verification_times_out() {
    let router = Arc::new(Router::new());
    let clock = manual_clock();
    let a1 = timed_dev(&router, "@alice:hs", "A1", &clock).await;
    let a2 = timed_dev(&router, "@alice:hs", "A2", &clock).await;
    settle(&[&a1, &a2], &[uid("@alice:hs")]).await;
    let (flow, request) =
        a1.machine.request_verification(&uid("@alice:hs"), &did("A2")).await.unwrap();
    a1.send(&request).await.unwrap();
    a2.sync().await.unwrap();

    clock.advance(10 * 60 * 1000 - 1);
    a1.sync().await.unwrap();
    assert!(!matches!(
        a1.machine.verification_state(&flow).await,
        Some(VerificationState::Cancelled { .. })
    ));
    clock.advance(1);
    a1.sync().await.unwrap();
    assert_eq!(
        a1.machine.verification_state(&flow).await,
        Some(VerificationState::Cancelled { code: CancelCode::Timeout, by_us: true })
    );
    a2.sync().await.unwrap();
    assert_eq!(
        a2.machine.verification_state(&flow).await,
        Some(VerificationState::Cancelled { code: CancelCode::Timeout, by_us: false })
    );
}
