//! A NOTIFY payload as a worker receives it: any application may `pg_notify` anything on
//! a channel pgpush listens to. Also checks that what pgpush itself wraps comes back
//! unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgpush::protocol::payload::{self, Message, Meta};

fuzz_target!(|data: &[u8]| {
    // PostgreSQL hands payloads over as text
    let text = String::from_utf8_lossy(data);
    let _ = payload::unwrap_with_meta(&text);
    let _ = payload::unwrap(&text);
    let _ = payload::deleted_text(&text);
    let _ = payload::channel_of(&text);
    let _ = payload::channel_name_of(&text);

    // round trips of what pgpush wraps
    let (head, tail) = data.split_at(data.len() / 2);
    let event_id = String::from_utf8_lossy(head).into_owned();
    let meta = Meta { event_id: Some(event_id.clone()), ..Meta::default() };
    let wrapped = payload::wrap_text_with(&text, &meta);
    let (message, back) = payload::unwrap_with_meta(&wrapped);
    assert_eq!(message.bytes(), text.as_bytes());
    assert_eq!(back.event_id.as_deref(), Some(event_id.as_str()));
    let wrapped = payload::wrap_binary(tail);
    match payload::unwrap(&wrapped) {
        Message::Binary(b) => assert_eq!(b, tail),
        Message::Text(t) => panic!("binary came back as text {t:?}"),
    }
    let plain = payload::wrap_text(&text);
    assert_eq!(payload::unwrap(&plain).bytes(), text.as_bytes());
    let deleted = payload::wrap_deleted(data);
    assert_eq!(payload::deleted_text(&deleted).as_deref(), Some(data));
});
