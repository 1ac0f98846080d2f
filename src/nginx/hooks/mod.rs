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
    args: Box<[u8]>,
    unsubscribed: Option<Box<[u8]>>,
    publish: Option<Box<[u8]>>,
    /// Made on the first client message.
    publishing: Option<Box<Publishing>>,
}

/// The publish hook's calls: one at a time keeps the answers in order.
struct Publishing {
    queue: VecDeque<Vec<u8>>,
    inflight: Option<CallRef>,
    replies: Replies,
}

impl HttpHooks {
    /// Starts the next queued publish call, if none is running.
    fn next(&mut self) {
        let (Some(target), Some(p)) = (&self.publish, self.publishing.as_mut()) else {
            return;
        };
        if p.inflight.is_some() {
            return;
        }
        while let Some(body) = p.queue.pop_front() {
            let replies = p.replies.clone();
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
                p.inflight = Some(c);
                return;
            }
        }
    }
}

/// What a subscriber keeps for its hooks.
pub struct Hooks {
    lcf: &'static LocConf,
    /// The extra values (`$3`...) of on_subscribe, on_unsubscribe and on_publish, one
    /// after the other.
    values: Box<[Option<Box<str>>]>,
    /// on_publish calls whose rows have not come back.
    pending: Vec<u64>,
    http: Option<Box<HttpHooks>>,
}

/// A client message as hooks see it.
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

fn count(h: &Option<Rc<SqlHook>>) -> usize {
    h.as_ref().map_or(0, |h| h.values.len())
}

/// A subscriber is admitted to these channels (`ids`, as the client named them): runs the
/// subscribe hooks and keeps what the others need. `None` when the location has no hook.
pub fn admit(
    r: &mut ngx_http_request_t,
    lcf: &'static LocConf,
    ids: &[&str],
) -> Option<Box<Hooks>> {
    if ids.is_empty() || !lcf.has_hooks() {
        return None;
    }
    let values =
        [&lcf.postgres_on_subscribe, &lcf.postgres_on_unsubscribe, &lcf.postgres_on_publish]
            .into_iter()
            .flatten()
            .flat_map(|h| h.values.iter())
            .map(|&cv| {
                req::complex_value(r, cv).map(|v| String::from_utf8_lossy(&v).into_owned().into())
            })
            .collect();
    let http = admit_http(r, lcf);
    let hooks = Box::new(Hooks { lcf, values, pending: Vec::new(), http });
    hooks.run(ON_SUBSCRIBE, ids, None, None);
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
    let args: Box<[u8]> = r.args.as_bytes().into();
    if let Some(target) = req::complex_value(r, sub) {
        http::call(&origin, SUBSCRIBED, &target, &args, None, None);
    }
    Some(Box::new(HttpHooks {
        origin,
        args,
        unsubscribed: req::complex_value(r, unsub).map(Vec::into_boxed_slice),
        publish: req::complex_value(r, publish).map(Vec::into_boxed_slice),
        publishing: None,
    }))
}

/// The subscriber left (for whatever reason): runs the unsubscribe hooks.
pub fn left(mut hooks: Hooks, ids: &[&str]) {
    let pending = std::mem::take(&mut hooks.pending);
    if !pending.is_empty() {
        worker::with(|w| pending.into_iter().for_each(|id| drop(w.take_hook(id))));
    }
    hooks.run(ON_UNSUBSCRIBE, ids, None, None);
    if let Some(h) = hooks.http.take() {
        if let Some(c) = h.publishing.and_then(|p| p.inflight) {
            c.detach();
        }
        if let Some(target) = &h.unsubscribed {
            http::call(&h.origin, UNSUBSCRIBED, target, &h.args, None, None);
        }
    }
}

/// The client sent a message: runs the publish hooks. `replies` gets what each call sends
/// back; the caller then tells [`Hooks::answered`].
pub fn client_message(hooks: &mut Hooks, ids: &[&str], message: &Message<'_>, replies: Replies) {
    if let Some(h) = hooks.http.as_mut().filter(|h| h.publish.is_some()) {
        let p = h.publishing.get_or_insert_with(|| {
            Box::new(Publishing {
                queue: VecDeque::new(),
                inflight: None,
                replies: replies.clone(),
            })
        });
        if p.queue.len() >= MAX_QUEUED {
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
            p.queue.push_back(body);
            h.next();
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
    let make = || -> HookReply {
        let replies = replies.clone();
        Box::new(move |id, rows| replies(Answer::Sql { id, rows }))
    };
    let calls = hooks.run(ON_PUBLISH, ids, Some(text), Some(&make));
    hooks.pending.extend(calls);
}

impl Hooks {
    /// Runs one SQL hook once per channel; returns the ids of calls that want rows.
    fn run(
        &self,
        name: &'static str,
        ids: &[&str],
        message: Option<String>,
        reply: Option<&dyn Fn() -> HookReply>,
    ) -> Vec<u64> {
        let lcf = self.lcf;
        let (n_sub, n_unsub) =
            (count(&lcf.postgres_on_subscribe), count(&lcf.postgres_on_unsubscribe));
        let (hook, values) = match name {
            ON_SUBSCRIBE => (&lcf.postgres_on_subscribe, &self.values[..n_sub]),
            ON_UNSUBSCRIBE => (&lcf.postgres_on_unsubscribe, &self.values[n_sub..n_sub + n_unsub]),
            _ => (&lcf.postgres_on_publish, &self.values[n_sub + n_unsub..]),
        };
        let Some(hook) = hook else { return Vec::new() };
        worker::with(|w| {
            let mut calls = Vec::new();
            for id in ids {
                let mut params = Vec::with_capacity(2 + values.len());
                params.push(Some((*id).to_string()));
                params.push(message.clone());
                params.extend(values.iter().map(|v| v.as_deref().map(str::to_string)));
                let done = reply.map(|make| make());
                let wants = done.is_some();
                let n = w.hook(name, hook.sql.clone(), params, done);
                if wants {
                    calls.push(n);
                }
            }
            calls
        })
        .unwrap_or_default()
    }

    /// A publish hook answered: the SQL call is forgotten, the next HTTP call starts.
    pub fn answered(&mut self, answer: &Answer) {
        match answer {
            Answer::Sql { id, .. } => self.pending.retain(|p| p != id),
            Answer::Http(_) => {
                if let Some(h) = self.http.as_mut() {
                    if let Some(p) = h.publishing.as_mut() {
                        p.inflight = None;
                    }
                    h.next();
                }
            }
        }
    }
}
