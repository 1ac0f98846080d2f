//! Request headers pgpush parses itself: `Last-Event-ID` (a position or an event id),
//! `Accept` (the statistics format) and percent-escaped complex values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgpush::postgres::store::Since;
use pgpush::protocol::{channels, info};

fuzz_target!(|data: &[u8]| {
    match Since::from_last_event_id(data) {
        Since::Position { epoch, offset } => {
            assert!(epoch >= 0 && offset >= 0);
            assert_eq!(format!("{epoch}:{offset}").len() <= data.len(), true);
        }
        Since::EventId(id) => assert_eq!(id, String::from_utf8_lossy(data)),
        other => panic!("a Last-Event-ID gave {other:?}"),
    }
    let format = info::select(Some(data));
    assert!(!format.content_type.is_empty());
    let unescaped = channels::unescape(data);
    assert!(unescaped.len() <= data.len());
});
