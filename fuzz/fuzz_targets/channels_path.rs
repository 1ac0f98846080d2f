//! A request's channels path (`push_stream_channels_path`, from the URL): parsed as
//! push-stream does, each id mapped to the name LISTEN and `pg_notify` use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgpush::protocol::channels::{self, Limits};

fuzz_target!(|data: &[u8]| {
    for max_id_length in [None, Some(8)] {
        let limits = Limits { max_id_length, pg_prefix: "app_" };
        let Ok(list) = channels::parse_path(data, limits) else { continue };
        assert!(!list.is_empty());
        for (k, c) in list.iter().enumerate() {
            assert!(!c.id.is_empty() && !c.id.contains('/') && !c.id.contains('\0'));
            assert!(c.id != "ALL" && !c.id.contains('*'));
            assert!(max_id_length.is_none_or(|max| c.id.len() <= max));
            // repeats are merged
            assert!(list[..k].iter().all(|o| o.id != c.id));
            let channel = channels::pg_channel(limits.pg_prefix, &c.id);
            let name = channels::listen_name(&channel);
            assert!(name.len() <= 63, "a LISTEN name is an identifier");
            assert_eq!(name.len() < channel.len(), channels::is_derived(&channel));
            let quoted = channels::quote_ident(&name);
            // the name is one quoted identifier: every inner quote doubled
            let inner = &quoted[1..quoted.len() - 1];
            assert!(quoted.starts_with('"') && quoted.ends_with('"'));
            assert_eq!(inner.replace("\"\"", "\"").len(), name.len());
        }
    }
    let (id, _) = channels::split_backtrack(data);
    assert!(id.len() <= data.len());
});
