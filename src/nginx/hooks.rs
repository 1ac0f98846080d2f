//! A subscriber's hooks: `push_stream_postgres_on_subscribe`, `_on_unsubscribe` and
//! `_on_publish` (SQL, run by the worker's hook connection).
//!
//! Everything a hook needs from the subscriber's request is taken when the subscriber is
//! admitted, since the request itself does not live as long as the subscriber: the
//! channel ids and each hook's extra values (`$3`...), evaluated once. Unsubscribe uses
//! the values kept from subscribe time. A location without hooks keeps nothing.

use std::rc::Rc;

use nginx_sys::ngx_http_request_t;

use crate::nginx::conf::{LocConf, SqlHook};
use crate::nginx::http;
use crate::nginx::worker::{self, HookReply};
use crate::postgres::cells::Reply;

const ON_SUBSCRIBE: &str = "push_stream_postgres_on_subscribe";
const ON_UNSUBSCRIBE: &str = "push_stream_postgres_on_unsubscribe";
const ON_PUBLISH: &str = "push_stream_postgres_on_publish";

/// What a subscriber keeps for its hooks.
pub struct Hooks {
    lcf: &'static LocConf,
    /// The channel ids as the client named them (`$1`).
    ids: Vec<String>,
    /// The extra values of on_subscribe, on_unsubscribe and on_publish.
    values: [Vec<Option<String>>; 3],
    /// on_publish calls whose rows have not come back.
    pending: Vec<u64>,
}

/// A client message as hooks see it.
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// A subscriber is admitted to these channels: runs the subscribe hooks and keeps what the
/// others need. `None` when the location has no hook.
pub fn admit(
    r: &mut ngx_http_request_t,
    lcf: &'static LocConf,
    ids: Vec<String>,
) -> Option<Box<Hooks>> {
    if ids.is_empty() || !lcf.has_hooks() {
        return None;
    }
    let mut eval = |h: &Option<Rc<SqlHook>>| -> Vec<Option<String>> {
        let Some(h) = h else { return Vec::new() };
        h.values
            .iter()
            .map(|&cv| http::complex_value(r, cv).map(|v| String::from_utf8_lossy(&v).into_owned()))
            .collect()
    };
    let values = [
        eval(&lcf.postgres_on_subscribe),
        eval(&lcf.postgres_on_unsubscribe),
        eval(&lcf.postgres_on_publish),
    ];
    let hooks = Box::new(Hooks { lcf, ids, values, pending: Vec::new() });
    hooks.run(ON_SUBSCRIBE, &lcf.postgres_on_subscribe, &hooks.values[0], None, None);
    Some(hooks)
}

/// The subscriber left (for whatever reason): runs the unsubscribe hooks.
pub fn left(mut hooks: Hooks) {
    let pending = std::mem::take(&mut hooks.pending);
    if !pending.is_empty() {
        worker::with(|w| pending.into_iter().for_each(|id| drop(w.take_hook(id))));
    }
    hooks.run(ON_UNSUBSCRIBE, &hooks.lcf.postgres_on_unsubscribe, &hooks.values[1], None, None);
}

/// The client sent a message: runs the publish hooks; `reply` gets each call's id and rows
/// (the caller then forgets the call with [`Hooks::answered`]).
pub fn client_message(
    hooks: &mut Hooks,
    message: &Message<'_>,
    reply: impl Fn(u64, Vec<Reply>) + Clone + 'static,
) {
    let text = match message {
        Message::Text(t) => (*t).to_string(),
        // bytea's text form: `$2::bytea` gives the bytes back
        Message::Binary(b) => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in *b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
    };
    let lcf = hooks.lcf;
    let make = || -> HookReply {
        let reply = reply.clone();
        Box::new(reply)
    };
    let ids =
        hooks.run(ON_PUBLISH, &lcf.postgres_on_publish, &hooks.values[2], Some(text), Some(&make));
    hooks.pending.extend(ids);
}

impl Hooks {
    /// Runs one SQL hook once per channel; returns the ids of calls that want rows.
    fn run(
        &self,
        name: &'static str,
        hook: &Option<Rc<SqlHook>>,
        values: &[Option<String>],
        message: Option<String>,
        reply: Option<&dyn Fn() -> HookReply>,
    ) -> Vec<u64> {
        let Some(hook) = hook else { return Vec::new() };
        worker::with(|w| {
            let mut ids = Vec::new();
            for id in &self.ids {
                let mut params = Vec::with_capacity(2 + values.len());
                params.push(Some(id.clone()));
                params.push(message.clone());
                params.extend(values.iter().cloned());
                let done = reply.map(|make| make());
                let wants = done.is_some();
                let n = w.hook(name, hook.sql.clone(), params, done);
                if wants {
                    ids.push(n);
                }
            }
            ids
        })
        .unwrap_or_default()
    }

    /// Forgets a call whose rows came back.
    pub fn answered(&mut self, id: u64) {
        self.pending.retain(|p| *p != id);
    }
}
