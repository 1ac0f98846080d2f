//! A subscriber's hooks: `push_stream_postgres_on_subscribe`, `_on_unsubscribe` and
//! `_on_publish` (SQL, run by the worker's hook connection), and the push-stream fork's
//! `push_stream_client_subscribed_request`, `_unsubscribed_request` and
//! `_publish_request` (subrequests, see [`http`]).
//!
//! Everything a hook needs from the subscriber's request is taken when the subscriber is
//! admitted, since the request itself does not live as long as the subscriber: the
//! channel ids and each hook's extra values (`$3`...), evaluated once; the HTTP hooks'
//! targets and the request's args and addresses. Unsubscribe uses what was kept from
//! subscribe time. A location without hooks keeps nothing.

pub mod http;

use std::collections::VecDeque;
use std::rc::Rc;

use nginx_sys::ngx_http_request_t;

use self::http::{CallRef, Origin};
use crate::nginx::conf::{LocConf, SqlHook};
use crate::nginx::http as req;
use crate::nginx::worker::{self, HookReply};
use crate::postgres::cells::Reply;

const ON_SUBSCRIBE: &str = "push_stream_postgres_on_subscribe";
const ON_UNSUBSCRIBE: &str = "push_stream_postgres_on_unsubscribe";
const ON_PUBLISH: &str = "push_stream_postgres_on_publish";
const SUBSCRIBED: &str = "push_stream_client_subscribed_request";
const UNSUBSCRIBED: &str = "push_stream_client_unsubscribed_request";
const PUBLISH: &str = "push_stream_client_publish_request";

/// Client messages waiting for their turn at `push_stream_client_publish_request`.
const MAX_QUEUED: usize = 1024;

/// What a publish hook sent back.
pub enum Answer {
    Sql {
        id: u64,
        rows: Vec<Reply>,
    },
    /// The HTTP publish hook's body, if it was a 2xx with a body.
    Http(Option<Reply>),
}

/// Where the HTTP hooks' answers go.
pub type Replies = Rc<dyn Fn(Answer)>;

/// The HTTP hooks of a subscriber.
struct HttpHooks {
    origin: Origin,
    /// The subscriber's request args, for targets without `?`.
    args: Vec<u8>,
    unsubscribed: Option<Vec<u8>>,
    publish: Option<Vec<u8>>,
    /// Messages for the publish hook; one call at a time keeps replies in order.
    queue: VecDeque<Vec<u8>>,
    inflight: Option<CallRef>,
    replies: Option<Replies>,
}

impl HttpHooks {
    /// Starts the next queued publish call, if none is running.
    fn next(&mut self) {
        if self.inflight.is_some() {
            return;
        }
        let (Some(target), Some(replies)) = (&self.publish, &self.replies) else {
            return;
        };
        while let Some(body) = self.queue.pop_front() {
            let replies = replies.clone();
            let done: http::Done = Box::new(move |status, out| {
                let body = ((200..300).contains(&status) && !out.is_empty()).then(|| {
                    match String::from_utf8(out.to_vec()) {
                        Ok(t) => Reply::Text(t),
                        Err(e) => Reply::Binary(e.into_bytes()),
                    }
                });
                replies(Answer::Http(body));
            });
            if let Some(c) =
                http::call(&self.origin, PUBLISH, target, &self.args, Some(body), Some(done))
            {
                self.inflight = Some(c);
                return;
            }
        }
    }
}

/// What a subscriber keeps for its hooks.
pub struct Hooks {
    lcf: &'static LocConf,
    /// The channel ids as the client named them (`$1`).
    ids: Vec<String>,
    /// The extra values of on_subscribe, on_unsubscribe and on_publish.
    values: [Vec<Option<String>>; 3],
    /// on_publish calls whose rows have not come back.
    pending: Vec<u64>,
    http: Option<Box<HttpHooks>>,
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
            .map(|&cv| req::complex_value(r, cv).map(|v| String::from_utf8_lossy(&v).into_owned()))
            .collect()
    };
    let values = [
        eval(&lcf.postgres_on_subscribe),
        eval(&lcf.postgres_on_unsubscribe),
        eval(&lcf.postgres_on_publish),
    ];
    let http = admit_http(r, lcf);
    let hooks = Box::new(Hooks { lcf, ids, values, pending: Vec::new(), http });
    hooks.run(ON_SUBSCRIBE, &lcf.postgres_on_subscribe, &hooks.values[0], None, None);
    Some(hooks)
}

/// The HTTP hooks: the subscribed call now, the others' targets kept.
fn admit_http(r: &mut ngx_http_request_t, lcf: &LocConf) -> Option<Box<HttpHooks>> {
    let (sub, unsub, publish) = (
        lcf.client_subscribed_request,
        lcf.client_unsubscribed_request,
        lcf.client_publish_request,
    );
    if sub.is_null() && unsub.is_null() && publish.is_null() {
        return None;
    }
    // SAFETY: r is the subscriber's live main request
    let origin = unsafe { Origin::of(r) };
    let args = r.args.as_bytes().to_vec();
    if let Some(target) = req::complex_value(r, sub) {
        http::call(&origin, SUBSCRIBED, &target, &args, None, None);
    }
    Some(Box::new(HttpHooks {
        origin,
        args,
        unsubscribed: req::complex_value(r, unsub),
        publish: req::complex_value(r, publish),
        queue: VecDeque::new(),
        inflight: None,
        replies: None,
    }))
}

/// The subscriber left (for whatever reason): runs the unsubscribe hooks.
pub fn left(mut hooks: Hooks) {
    let pending = std::mem::take(&mut hooks.pending);
    if !pending.is_empty() {
        worker::with(|w| pending.into_iter().for_each(|id| drop(w.take_hook(id))));
    }
    hooks.run(ON_UNSUBSCRIBE, &hooks.lcf.postgres_on_unsubscribe, &hooks.values[1], None, None);
    if let Some(h) = hooks.http.take() {
        if let Some(c) = h.inflight {
            c.detach();
        }
        if let Some(target) = &h.unsubscribed {
            http::call(&h.origin, UNSUBSCRIBED, target, &h.args, None, None);
        }
    }
}

/// The client sent a message: runs the publish hooks. `replies` gets what each call sends
/// back; the caller then tells [`Hooks::answered`].
pub fn client_message(hooks: &mut Hooks, message: &Message<'_>, replies: Replies) {
    if let Some(h) = hooks.http.as_mut() {
        if h.publish.is_some() {
            if h.queue.len() >= MAX_QUEUED {
                ngx::ngx_log_error!(
                    nginx_sys::NGX_LOG_WARN,
                    h.origin.log(),
                    "pgpush: {} skipped: {} messages of this client already wait for it",
                    PUBLISH,
                    MAX_QUEUED
                );
            } else {
                let body = match message {
                    Message::Text(t) => t.as_bytes().to_vec(),
                    Message::Binary(b) => b.to_vec(),
                };
                h.queue.push_back(body);
                h.replies = Some(replies.clone());
                h.next();
            }
        }
    }
    if hooks.lcf.postgres_on_publish.is_none() {
        return;
    }
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
        let replies = replies.clone();
        Box::new(move |id, rows| replies(Answer::Sql { id, rows }))
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

    /// A publish hook answered: the SQL call is forgotten, the next HTTP call starts.
    pub fn answered(&mut self, answer: &Answer) {
        match answer {
            Answer::Sql { id, .. } => self.pending.retain(|p| p != id),
            Answer::Http(_) => {
                if let Some(h) = self.http.as_mut() {
                    h.inflight = None;
                    h.next();
                }
            }
        }
    }
}
