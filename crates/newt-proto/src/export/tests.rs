use aes::cipher::{KeyIvInit, StreamCipher};
use base64::Engine as _;
use hmac::Mac;

use super::armor::{plain_run, Base64Stream, LINE_LEN};
use super::container::HEADER_LEN;
use super::container::{Aes256Ctr, DerivedKeys, IV_LEN, KEY_LEN, MAC_LEN, SALT_LEN, VERSION};
use super::json::json_error;
use super::*;

/// The whole decoded payload of an armored body.
fn decode_base64_body(body: &str) -> Result<Vec<u8>, ExportError> {
    let mut out = Vec::new();
    let mut stream = Base64Stream::new(body);
    while !stream.finished() {
        stream.step(&mut out)?;
    }
    Ok(out)
}

/// The fields of a decoded payload, borrowed from it.
struct Payload<'a> {
    salt: &'a [u8; SALT_LEN],
    iv: &'a [u8; IV_LEN],
    rounds: u32,
    ciphertext: &'a [u8],
    /// Everything the MAC covers: the payload without the MAC.
    authenticated: &'a [u8],
    mac: &'a [u8; MAC_LEN],
}

impl<'a> Payload<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, ExportError> {
        match payload.first() {
            None => return Err(ExportError::TooShort),
            Some(&VERSION) => {}
            Some(&other) => return Err(ExportError::UnsupportedVersion(other)),
        }
        let (authenticated, mac) =
            payload.split_last_chunk::<MAC_LEN>().ok_or(ExportError::TooShort)?;
        let rest = authenticated.get(1..).ok_or(ExportError::TooShort)?;
        let (salt, rest) = rest.split_first_chunk::<SALT_LEN>().ok_or(ExportError::TooShort)?;
        let (iv, rest) = rest.split_first_chunk::<IV_LEN>().ok_or(ExportError::TooShort)?;
        let (rounds, ciphertext) = rest.split_first_chunk::<4>().ok_or(ExportError::TooShort)?;
        Ok(Self { salt, iv, rounds: u32::from_be_bytes(*rounds), ciphertext, authenticated, mac })
    }
}

/// Reading as it was done before there was one decoder: the whole payload
/// decoded, its fields parsed, the MAC checked, then the whole plaintext
/// parsed by serde. A reference the streaming reader is held to.
fn reference_decrypt(file: &str, passphrase: &str) -> Result<Vec<ExportedRoomKey>, ExportError> {
    let payload = decode_base64_body(armored_body(file)?)?;
    let parts = Payload::parse(&payload)?;
    if parts.rounds == 0 {
        return Err(ExportError::ZeroRounds);
    }
    if parts.rounds > DEFAULT_MAX_ROUNDS {
        return Err(ExportError::TooManyRounds { rounds: parts.rounds, max: DEFAULT_MAX_ROUNDS });
    }
    let keys = DerivedKeys::new(passphrase, parts.salt, parts.rounds);
    keys.mac(parts.authenticated).verify_slice(parts.mac).map_err(|_| ExportError::BadMac)?;
    let mut plaintext = parts.ciphertext.to_vec();
    keys.cipher(parts.iv).apply_keystream(&mut plaintext);
    serde_json::from_slice(&plaintext).map_err(json_error)
}

#[test]
fn plain_run_stops_where_a_byte_scan_stops() {
    let naive =
        |r: &[u8]| r.iter().position(|&c| c == b'=' || c.is_ascii_whitespace()).unwrap_or(r.len());
    let base = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9w".to_vec();
    for stop in [b'=', b'\n', b'\r', b'\t', b' ', 0x0c, 0x01, 0x1f] {
        for at in 0..base.len() {
            let mut input = base.clone();
            input[at] = stop;
            // 0x01 and 0x1f are not whitespace: the run goes past them.
            assert_eq!(plain_run(&input), naive(&input), "byte {stop:#x} at {at}");
        }
    }
    assert_eq!(plain_run(&base), base.len());
    assert_eq!(plain_run(b""), 0);
}

fn key(n: u8) -> ExportedRoomKey {
    ExportedRoomKey {
        algorithm: crate::MEGOLM_V1.to_owned(),
        room_id: format!("!room{n}:example.org"),
        sender_key: "cKQkLU8izjY3tpLVPiR4PDeeCEKtaDiAGiQH+UbZm2w".to_owned(),
        session_id: format!("session{n}"),
        session_key: format!("SECRET-SESSION-KEY-{n}"),
        sender_claimed_keys: BTreeMap::from([("ed25519".to_owned(), "edkey".to_owned())]),
        forwarding_curve25519_key_chain: vec!["chain\"with\\escapes".to_owned()],
        shared_history: n.is_multiple_of(2),
    }
}

fn body_of(file: &str) -> String {
    armored_body(file).unwrap().split_whitespace().collect()
}

fn rearmor(body: &str) -> String {
    format!("{HEADER}\n{body}\n{FOOTER}\n")
}

#[test]
fn round_trip() {
    let keys: Vec<_> = (0..5).map(key).collect();
    let file = encrypt_export(&keys, "pässwörd", 1).unwrap();
    assert_eq!(decrypt_export(&file, "pässwörd").unwrap(), keys);
    assert_eq!(decrypt_export(&file, "password"), Err(ExportError::BadMac));
    assert_eq!(decrypt_export(&encrypt_export(&[], "p", 1).unwrap(), "p").unwrap(), vec![]);
}

#[test]
fn output_format() {
    let keys: Vec<_> = (0..3).map(key).collect();
    let file = encrypt_export(&keys, "p", 3).unwrap();
    let lines: Vec<&str> = file.split('\n').collect();
    assert_eq!(lines.first(), Some(&HEADER));
    assert_eq!(lines[lines.len() - 2], FOOTER);
    assert_eq!(lines.last(), Some(&""), "trailing newline");
    let body = &lines[1..lines.len() - 2];
    assert!(body[..body.len() - 1].iter().all(|l| l.len() == LINE_LEN));
    assert!(!body[body.len() - 1].is_empty() && body[body.len() - 1].len() <= LINE_LEN);
    assert!(!file.contains('\r'));

    let payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
    let parts = Payload::parse(&payload).unwrap();
    assert_eq!(payload[0], 1);
    assert_eq!(parts.rounds, 3);
}

#[test]
fn iv_bit_63_is_cleared_and_salt_is_fresh() {
    let mut salts = std::collections::HashSet::new();
    for _ in 0..64 {
        let file = encrypt_export_bytes(b"x", "p", 1).unwrap();
        let payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
        let parts = Payload::parse(&payload).unwrap();
        assert_eq!(parts.iv[8] & 0x80, 0);
        assert!(salts.insert(*parts.salt));
    }
}

#[test]
fn counter_flavours_agree_when_bit_63_is_clear() {
    // Our 64-bit counter and matrix-rust-sdk's 128-bit one give the same
    // keystream for every IV we write, even across the low half's top bit.
    let key = [7u8; KEY_LEN];
    let mut iv = [0xffu8; IV_LEN];
    iv[8] = 0x7f; // low half = 2^63 - 1: the next block sets bit 63
    let mut a = [0u8; 16 * 4];
    let mut b = [0u8; 16 * 4];
    Aes256Ctr::new((&key).into(), (&iv).into()).apply_keystream(&mut a);
    ctr::Ctr128BE::<aes::Aes256>::new((&key).into(), (&iv).into()).apply_keystream(&mut b);
    assert_eq!(a, b);
}

#[test]
fn zero_rounds_rejected() {
    assert_eq!(encrypt_export(&[key(1)], "p", 0), Err(ExportError::ZeroRounds));
    assert_eq!(encrypt_export_bytes(b"[]", "p", 0), Err(ExportError::ZeroRounds));
    // A file that claims zero rounds.
    let file = encrypt_export(&[key(1)], "p", 1).unwrap();
    let mut payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
    payload[33..37].copy_from_slice(&0u32.to_be_bytes());
    let forged = rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload));
    assert_eq!(decrypt_export(&forged, "p"), Err(ExportError::ZeroRounds));
}

#[test]
fn missing_header_and_footer() {
    let file = encrypt_export(&[key(1)], "p", 1).unwrap();
    assert_eq!(decrypt_export("", "p"), Err(ExportError::MissingHeader));
    assert_eq!(decrypt_export("-----", "p"), Err(ExportError::MissingHeader));
    assert_eq!(
        decrypt_export(&file.replace("BEGIN", "BEGUN"), "p"),
        Err(ExportError::MissingHeader)
    );
    assert_eq!(decrypt_export(&file.replace(FOOTER, ""), "p"), Err(ExportError::MissingFooter));
    assert_eq!(decrypt_export(&format!("{HEADER}\n-----"), "p"), Err(ExportError::MissingFooter));
}

#[test]
fn truncated_input() {
    // matrix-react-sdk's "should handle a too-short body".
    let short = format!(
        "{HEADER}\nAXNhbHRzYWx0c2FsdHNhbHSIiIiIiIiIiIiIiIiIiIiIAAAACmIRUW2OjZ3L2l6j9h0lHlV3M2dx\ncissyYBxjsfsAn\n{FOOTER}\n"
    );
    assert_eq!(decrypt_export(&short, "p"), Err(ExportError::TooShort));
    assert_eq!(decrypt_export(&rearmor(""), "p"), Err(ExportError::TooShort));
    assert_eq!(decrypt_export(&rearmor("AQ"), "p"), Err(ExportError::TooShort));

    let file = encrypt_export(&[key(1)], "p", 1).unwrap();
    let body = body_of(&file);
    // Dropping whole 4-character groups from the end cuts into the MAC.
    let cut = rearmor(&body[..body.len() - 8]);
    assert_eq!(decrypt_export(&cut, "p"), Err(ExportError::BadMac));
    // Every truncation fails cleanly (dropping only `=` padding is no
    // truncation, so stop before it).
    for n in 0..body.trim_end_matches('=').len() {
        assert!(decrypt_export(&rearmor(&body[..n]), "p").is_err(), "{n}");
        assert!(decrypt_export(&file[..n], "p").is_err(), "{n}");
    }
}

#[test]
fn garbage_base64() {
    assert_eq!(decrypt_export(&rearmor("AQ!@#$"), "p"), Err(ExportError::Base64));
    assert_eq!(decrypt_export(&rearmor("A"), "p"), Err(ExportError::Base64));
    assert_eq!(decrypt_export(&rearmor("===="), "p"), Err(ExportError::Base64));
    assert_eq!(decrypt_export(&rearmor("AQ=A"), "p"), Err(ExportError::Base64));
    assert_eq!(decrypt_export(&rearmor("Zm9v\u{e9}"), "p"), Err(ExportError::Base64));
}

#[test]
fn unsupported_version() {
    let file = encrypt_export(&[key(1)], "p", 1).unwrap();
    let mut payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
    payload[0] = 2;
    let v2 = rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload));
    assert_eq!(decrypt_export(&v2, "p"), Err(ExportError::UnsupportedVersion(2)));
    assert_eq!(decrypt_export(&rearmor("Ag"), "p"), Err(ExportError::UnsupportedVersion(2)));
}

#[test]
fn tolerant_reading() {
    let keys = vec![key(1), key(2)];
    let file = encrypt_export(&keys, "p", 1).unwrap();
    let body = body_of(&file);
    let unpadded = body.trim_end_matches('=');
    let payload = decode_base64_body(&body).unwrap();

    let mut variants = vec![
        file.replace('\n', "\r\n"),
        format!("\n\n  \t{file}\n\n  "),
        rearmor(unpadded),
        format!("{HEADER}{unpadded}{FOOTER}"),
        rearmor(
            &body
                .chars()
                .collect::<Vec<_>>()
                .chunks(7)
                .map(|c| c.iter().collect::<String>())
                .collect::<Vec<_>>()
                .join("\n "),
        ),
    ];
    // Each line base64'd on its own, with padding, at several line sizes.
    for raw_per_line in [1, 2, 50, 96, 1000] {
        let lines: Vec<String> = payload
            .chunks(raw_per_line)
            .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
            .collect();
        variants.push(rearmor(&lines.join("\r\n")));
    }
    for v in variants {
        assert_eq!(decrypt_export(&v, "p").unwrap(), keys, "{v:?}");
    }
}

/// Bodies longer than the decoder's chunk, wrapped at odd widths or
/// base64'd line by line with padding, decode the same as whole.
#[test]
fn tolerant_reading_of_a_large_file() {
    let keys: Vec<_> = (0..400u32).map(|i| key((i % 256) as u8)).collect();
    let file = encrypt_export(&keys, "p", 1).unwrap();
    let body = body_of(&file);
    assert!(body.len() > 2 * 64 * 1024, "{}", body.len());
    let payload = decode_base64_body(&body).unwrap();
    let wrapped = |width: usize| {
        let chars: Vec<char> = body.chars().collect();
        chars.chunks(width).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>()
    };
    let mut variants = vec![
        rearmor(body.trim_end_matches('=')),
        rearmor(&wrapped(7).join("\n ")),
        rearmor(&wrapped(65_537).join("\r\n")),
    ];
    for raw_per_line in [49_151, 96] {
        let lines: Vec<String> = payload
            .chunks(raw_per_line)
            .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
            .collect();
        variants.push(rearmor(&lines.join("\n")));
    }
    for v in variants {
        assert_eq!(decode_base64_body(armored_body(&v).unwrap()).unwrap(), payload);
        assert_eq!(decrypt_export(&v, "p").unwrap(), keys);
    }
}

#[test]
fn json_handling() {
    let raw = br#"[{"algorithm":"m.megolm.v1.aes-sha2","room_id":"!r:x","sender_key":"s","session_id":"i","session_key":"k","unknown":{"a":[1]}}]"#;
    let keys = decrypt_export(&encrypt_export_bytes(raw, "p", 1).unwrap(), "p").unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].sender_claimed_keys.is_empty());
    assert!(keys[0].forwarding_curve25519_key_chain.is_empty());
    assert!(!keys[0].shared_history);
    // `shared_history: false` is left out when writing.
    let json = serde_json::to_string(&keys[0]).unwrap();
    assert!(!json.contains("shared_history"));
    assert!(serde_json::to_string(&key(2)).unwrap().contains(r#""shared_history":true"#));

    for bad in [&b"{}"[..], b"[1]", b"", b"[] x", br#"[{"room_id":"!r:x"}]"#, b"\xff"] {
        let file = encrypt_export_bytes(bad, "p", 1).unwrap();
        assert!(matches!(decrypt_export(&file, "p"), Err(ExportError::Json(_))), "{bad:?}");
    }
    // Error messages do not quote values from the file.
    let leaky = br#"[{"algorithm":"a","room_id":"r","sender_key":"s","session_id":"i","session_key":"k","sender_claimed_keys":"TOPSECRET"}]"#;
    let err = decrypt_export(&encrypt_export_bytes(leaky, "p", 1).unwrap(), "p").unwrap_err();
    assert!(!err.to_string().contains("TOPSECRET"), "{err}");
}

#[test]
fn callback_progress_and_early_stop() {
    let keys: Vec<_> = (0..4).map(key).collect();
    let file = encrypt_export(&keys, "p", 1).unwrap();

    let mut seen = Vec::new();
    let flow = decrypt_export_with(&file, "p", |k, done, total| {
        seen.push((k.session_id, done, total));
        ControlFlow::<()>::Continue(())
    })
    .unwrap();
    assert_eq!(flow, ControlFlow::Continue(4));
    let expected: Vec<_> = (0..4).map(|n| (format!("session{n}"), n as usize + 1, 4)).collect();
    assert_eq!(seen, expected);

    let mut calls = 0;
    let flow = decrypt_export_with(&file, "p", |_, done, _| {
        calls += 1;
        if done == 2 {
            ControlFlow::Break("store full")
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(flow, ControlFlow::Break("store full"));
    assert_eq!(calls, 2);

    // A bad entry anywhere means no key is handed out.
    let raw = br#"[{"algorithm":"a","room_id":"r","sender_key":"s","session_id":"i","session_key":"k"},{"algorithm":1}]"#;
    let mut calls = 0;
    let result =
        decrypt_export_with(&encrypt_export_bytes(raw, "p", 1).unwrap(), "p", |_, _, _| {
            calls += 1;
            ControlFlow::<()>::Continue(())
        });
    assert!(matches!(result, Err(ExportError::Json(_))));
    assert_eq!(calls, 0);
}

#[test]
fn tampering_never_panics() {
    let file = encrypt_export(&[key(1)], "p", 1).unwrap();
    let body = body_of(&file);
    // Characters 44..52 hold the round count, and any change in length
    // before them shifts it: a random count could mean millions of PBKDF2
    // rounds (up to the limit), so only same-length substitutions go there.
    let rounds_chars = 44..52;
    for i in 0..body.len() {
        if rounds_chars.contains(&i) {
            continue;
        }
        let replacements: &[&str] = if i < rounds_chars.start {
            &["A", "/", "\u{e9}"]
        } else {
            &["A", "/", "=", " ", "\u{e9}", ""]
        };
        for replacement in replacements {
            let mut tampered = body.clone();
            tampered.replace_range(i..i + 1, replacement);
            if tampered == body {
                continue;
            }
            // Almost always an error; a change in the trailing bits of the
            // last group can decode to the same bytes. Either way, the
            // streaming reader says the same.
            assert_stream_agrees(&rearmor(&tampered), "p");
        }
    }
}

/// Every key of `file` through [`ExportStream`], `batch` at a time.
fn stream_all(
    file: &str,
    passphrase: &str,
    batch: usize,
) -> Result<Vec<ExportedRoomKey>, ExportError> {
    drain(ExportStream::open(file, passphrase), batch)
}

/// Every key of an opened stream, `batch` at a time.
fn drain(
    stream: Result<ExportStream<'_>, ExportError>,
    batch: usize,
) -> Result<Vec<ExportedRoomKey>, ExportError> {
    let mut stream = stream?;
    let mut keys = Vec::new();
    loop {
        let next = stream.next_batch(batch)?;
        if next.is_empty() {
            break;
        }
        assert!(next.len() <= batch);
        keys.extend(next);
        assert_eq!(stream.done(), keys.len());
    }
    assert_eq!(keys.len(), stream.total());
    Ok(keys)
}

/// The streaming reader agrees with reading whole, and both with
/// [`reference_decrypt`]: the same keys, or the same error (for JSON
/// errors, the same kind; messages may differ).
fn assert_stream_agrees(file: &str, passphrase: &str) {
    let whole = decrypt_export(file, passphrase);
    match (&whole, &reference_decrypt(file, passphrase)) {
        (Err(ExportError::Json(_)), Err(ExportError::Json(_))) => {}
        (whole, reference) => assert_eq!(whole, reference, "reference: {file:?}"),
    }
    for batch in [1, 3, 1000] {
        let streamed = stream_all(file, passphrase, batch);
        match (&whole, &streamed) {
            (Err(ExportError::Json(_)), Err(ExportError::Json(_))) => {}
            _ => assert_eq!(streamed, whole, "batch {batch}: {file:?}"),
        }
    }
    // Keys derived beforehand (as the driver does), once the header
    // reads: the same again.
    if let Ok(kdf) = ExportKdf::read(file, DEFAULT_MAX_ROUNDS) {
        let keyed = drain(ExportStream::open_with_keys(file, &kdf.derive(passphrase)), 3);
        match (&whole, &keyed) {
            (Err(ExportError::Json(_)), Err(ExportError::Json(_))) => {}
            _ => assert_eq!(keyed, whole, "with keys: {file:?}"),
        }
    }
}

#[test]
fn streaming_reader_agrees_with_whole_reading() {
    for n in [0u32, 1, 5, 400] {
        let keys: Vec<_> = (0..n).map(|i| key((i % 256) as u8)).collect();
        let file = encrypt_export(&keys, "pässwörd", 1).unwrap();
        assert_eq!(stream_all(&file, "pässwörd", 7).unwrap(), keys);
        assert_stream_agrees(&file, "pässwörd");
        assert_eq!(stream_all(&file, "password", 7), Err(ExportError::BadMac));
        // Line by line with padding, CRLF, odd wrapping.
        let body = body_of(&file);
        let payload = decode_base64_body(&body).unwrap();
        let lines: Vec<String> = payload
            .chunks(5)
            .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
            .collect();
        assert_stream_agrees(&rearmor(&lines.join("\r\n")), "pässwörd");
        assert_stream_agrees(&rearmor(body.trim_end_matches('=')), "pässwörd");
        // Truncated and cut anywhere.
        for cut in [0, 1, 4, 10, 40, 48, 50, 90, 92, body.len() / 2, body.len() - 4] {
            assert_stream_agrees(&rearmor(&body[..cut.min(body.len())]), "pässwörd");
        }
    }
    for bad_body in ["", "AQ", "Ag", "AQ!@#$", "A", "====", "AQ=A", "Zm9v\u{e9}"] {
        assert_stream_agrees(&rearmor(bad_body), "p");
    }
    assert_stream_agrees("no header", "p");
    // Zero rounds in an otherwise valid file.
    let file = encrypt_export(&[key(1)], "p", 1).unwrap();
    let mut payload = decode_base64_body(&body_of(&file)).unwrap();
    payload[1 + SALT_LEN + IV_LEN..HEADER_LEN].copy_from_slice(&0u32.to_be_bytes());
    let forged = rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload));
    assert_eq!(stream_all(&forged, "p", 1), Err(ExportError::ZeroRounds));
    // Plaintexts that are not an array of keys, or are, oddly spaced.
    let good = r#"{"algorithm":"m.megolm.v1.aes-sha2","room_id":"!r:x","sender_key":"s","session_id":"i]}","session_key":"k\"[{","unknown":{"a":[1,{"b":"]"}]}}"#;
    let raws = [
        "{}".to_owned(),
        "[1]".to_owned(),
        String::new(),
        "[] x".to_owned(),
        "[".to_owned(),
        "[ ]".to_owned(),
        " \n[\r\n]\t".to_owned(),
        "\x0c[]".to_owned(),
        "[]\x0c".to_owned(),
        format!("[{good}]"),
        format!("[ {good} , {good}\n]"),
        format!("[{good},]"),
        format!("[,{good}]"),
        format!("[{good}{good}]"),
        format!("[{good}"),
        format!("[{good}]]"),
        format!("[{good}] {good}"),
        r#"[{"room_id":"!r:x"}]"#.to_owned(),
        "[null]".to_owned(),
        "[\"x\"]".to_owned(),
        "[1 2]".to_owned(),
        "[}]".to_owned(),
    ];
    for raw in &raws {
        let file = encrypt_export_bytes(raw.as_bytes(), "p", 1).unwrap();
        assert_stream_agrees(&file, "p");
    }
    assert_eq!(
        stream_all(
            &encrypt_export_bytes(format!("[ {good} , {good}\n]").as_bytes(), "p", 1).unwrap(),
            "p",
            1
        )
        .unwrap()
        .len(),
        2
    );
    let file = encrypt_export_bytes(b"\xff", "p", 1).unwrap();
    assert!(matches!(stream_all(&file, "p", 1), Err(ExportError::Json(_))));
}

/// `file` with its round count replaced by `rounds` (the MAC no longer
/// matches; the count is checked before the MAC can be).
fn with_rounds(file: &str, rounds: u32) -> String {
    let mut payload = decode_base64_body(&body_of(file)).unwrap();
    payload[1 + SALT_LEN + IV_LEN..HEADER_LEN].copy_from_slice(&rounds.to_be_bytes());
    rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload))
}

#[test]
fn attack_export_file_asking_for_too_many_rounds_is_refused() {
    // u32::MAX PBKDF2 rounds would take over an hour of CPU. Every reader
    // refuses the file before deriving anything, which is why this test
    // is fast (without the check it would not finish; `ExportKdf::read`
    // derives nothing, so it goes first and fails fast instead).
    let file = with_rounds(&encrypt_export(&[key(1)], "p", 1).unwrap(), u32::MAX);
    let refused = ExportError::TooManyRounds { rounds: u32::MAX, max: DEFAULT_MAX_ROUNDS };
    assert_eq!(ExportKdf::read(&file, DEFAULT_MAX_ROUNDS), Err(refused.clone()));
    assert_eq!(ExportStream::open(&file, "p").err(), Some(refused.clone()));
    assert_eq!(decrypt_export(&file, "p"), Err(refused.clone()));
    assert_eq!(decrypt_export_bytes(&file, "p").err(), Some(refused.clone()));
    let flow = decrypt_export_with(&file, "p", |_, _, _| ControlFlow::<()>::Continue(()));
    assert_eq!(flow, Err(refused));
    // The limit itself is allowed, one more is not.
    let file = with_rounds(&file, DEFAULT_MAX_ROUNDS);
    assert_eq!(
        ExportKdf::read(&file, DEFAULT_MAX_ROUNDS).map(|k| k.rounds()),
        Ok(DEFAULT_MAX_ROUNDS)
    );
    let file = with_rounds(&file, DEFAULT_MAX_ROUNDS + 1);
    assert_eq!(
        ExportStream::open(&file, "p").err(),
        Some(ExportError::TooManyRounds {
            rounds: DEFAULT_MAX_ROUNDS + 1,
            max: DEFAULT_MAX_ROUNDS
        })
    );
}

#[test]
fn a_raised_or_lowered_limit_and_keys_derived_beforehand() {
    let file = encrypt_export(&[key(1)], "p", 10).unwrap();
    let refused = ExportError::TooManyRounds { rounds: 10, max: 9 };
    assert_eq!(ExportStream::open_with_max_rounds(&file, "p", 9).err(), Some(refused.clone()));
    let read = ExportStream::open_with_max_rounds(&file, "p", 10);
    assert_eq!(drain(read, 5).unwrap(), vec![key(1)]);
    // Derived beforehand, as on another thread.
    assert_eq!(ExportKdf::read(&file, 9), Err(refused));
    let kdf = ExportKdf::read(&file, 10).unwrap();
    assert_eq!(kdf.rounds(), 10);
    let keys = kdf.derive("p");
    assert_eq!(format!("{keys:?}"), "ExportKeys(<redacted>)");
    assert_eq!(drain(ExportStream::open_with_keys(&file, &keys), 5).unwrap(), vec![key(1)]);
    // A wrong passphrase, or the keys of another file: a bad MAC.
    let wrong = kdf.derive("q");
    assert_eq!(ExportStream::open_with_keys(&file, &wrong).err(), Some(ExportError::BadMac));
    let other = encrypt_export(&[key(1)], "p", 10).unwrap();
    assert_eq!(ExportStream::open_with_keys(&other, &keys).err(), Some(ExportError::BadMac));
    // Reading the header reports the header's errors.
    for (bad, error) in [
        ("no header".to_owned(), ExportError::MissingHeader),
        (rearmor(""), ExportError::TooShort),
        (rearmor("AQ"), ExportError::TooShort),
        (rearmor("Ag"), ExportError::UnsupportedVersion(2)),
        (rearmor("AQ!@#$"), ExportError::Base64),
        (with_rounds(&file, 0), ExportError::ZeroRounds),
    ] {
        assert_eq!(ExportKdf::read(&bad, DEFAULT_MAX_ROUNDS), Err(error), "{bad:?}");
    }
}

#[test]
fn debug_redacts_session_key() {
    let k = key(7);
    let debug = format!("{k:?}");
    assert!(!debug.contains("SECRET-SESSION-KEY"), "{debug}");
    assert!(debug.contains("session7"));
}
