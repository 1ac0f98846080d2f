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

use core::ptr;

use nginx_sys::{ngx_http_complex_value_t, ngx_http_request_t};

use self::http::{CallRef, Origin, Server};
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

/// The publish hooks' calls in flight, made on the first client message.
struct Publishing {
    /// SQL calls whose rows have not come back.
    pending: Vec<u64>,
    /// Messages for the HTTP publish hook; one call at a time keeps answers in order.
    queue: VecDeque<Vec<u8>>,
    inflight: Option<CallRef>,
    replies: Replies,
}

/// What a subscriber keeps for its hooks, in two allocations: this and `kept`.
pub struct Hooks {
    lcf: &'static LocConf,
    /// What was taken from the subscriber's request, as length-prefixed parts (see
    /// [`Kept`]): the SQL hooks' extra values, in hook order; then, with HTTP hooks, the
    /// client address, the local address, the address text, the args and the
    /// unsubscribe and publish targets (only when they have variables).
    kept: Box<[u8]>,
    /// The subscriber's server, with HTTP hooks.
    server: Option<Server>,
    publishing: Option<Box<Publishing>>,
}

/// Length-prefixed parts: a `u32` length (`u32::MAX` for none), then the bytes.
struct Kept;

impl Kept {
    fn push(out: &mut Vec<u8>, part: Option<&[u8]>) {
        match part {
            Some(p) => {
                out.extend_from_slice(&(p.len() as u32).to_ne_bytes());
                out.extend_from_slice(p);
            }
            None => out.extend_from_slice(&u32::MAX.to_ne_bytes()),
        }
    }

    fn parts(kept: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
        let mut rest = kept;
        core::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = u32::from_ne_bytes(*len);
            if len == u32::MAX {
                rest = tail;
                return Some(None);
            }
            let (part, tail) = tail.split_at(len as usize);
            rest = tail;
            Some(Some(part))
        })
    }
}

/// The parts of `kept` after the SQL values, with HTTP hooks.
struct HttpParts<'a> {
    origin: Origin<'a>,
    args: &'a [u8],
    unsubscribed: Option<&'a [u8]>,
    publish: Option<&'a [u8]>,
}

/// A client message as hooks see it.
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

fn count(h: &Option<Rc<SqlHook>>) -> usize {
    h.as_ref().map_or(0, |h| h.values.len())
}

/// A target with no variables is read from the configuration, not kept per subscriber.
fn is_static(cv: *mut ngx_http_complex_value_t) -> bool {
    // SAFETY: a compiled complex value from the configuration
    unsafe { cv.as_ref() }.is_some_and(|cv| cv.lengths.is_null())
}

fn static_value(cv: *mut ngx_http_complex_value_t) -> Option<&'static [u8]> {
    // SAFETY: as above; its value lives as long as the configuration
    unsafe { cv.as_ref() }
        .map(|cv| unsafe { core::slice::from_raw_parts(cv.value.data, cv.value.len) })
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
    let mut kept = Vec::new();
    for h in [&lcf.postgres_on_subscribe, &lcf.postgres_on_unsubscribe, &lcf.postgres_on_publish]
        .into_iter()
        .flatten()
    {
        for &cv in &h.values {
            Kept::push(&mut kept, req::complex_value(r, cv).as_deref());
        }
    }
    let (sub, unsub, publish) = (
        lcf.client_subscribed_request,
        lcf.client_unsubscribed_request,
        lcf.client_publish_request,
    );
    let mut server = None;
    if !(sub.is_null() && unsub.is_null() && publish.is_null()) {
        // SAFETY: r is the subscriber's live main request
        if let Some((s, addrs)) = unsafe { Server::of(r) } {
            addrs.iter().for_each(|a| Kept::push(&mut kept, Some(a)));
            Kept::push(&mut kept, Some(r.args.as_bytes()));
            for cv in [unsub, publish] {
                let dynamic = (!cv.is_null() && !is_static(cv)).then(|| req::complex_value(r, cv));
                Kept::push(&mut kept, dynamic.flatten().as_deref());
            }
            server = Some(s);
        }
    }
    let hooks = Box::new(Hooks { lcf, kept: kept.into(), server, publishing: None });
    hooks.run(ON_SUBSCRIBE, ids, None, None);
    if let Some(http) = hooks.http() {
        if let Some(target) = req::complex_value(r, sub) {
            http::call(&http.origin, SUBSCRIBED, &target, http.args, None, None);
        }
    }
    Some(hooks)
}

/// The subscriber left (for whatever reason): runs the unsubscribe hooks.
pub fn left(mut hooks: Hooks, ids: &[&str]) {
    if let Some(p) = hooks.publishing.take() {
        if !p.pending.is_empty() {
            worker::with(|w| p.pending.iter().for_each(|&id| drop(w.take_hook(id))));
        }
        if let Some(c) = p.inflight {
            c.detach();
        }
    }
    hooks.run(ON_UNSUBSCRIBE, ids, None, None);
    if let Some(http) = hooks.http() {
        if let Some(target) = http.unsubscribed {
            http::call(&http.origin, UNSUBSCRIBED, target, http.args, None, None);
        }
    }
}

/// The client sent a message: runs the publish hooks. `replies` gets what each call sends
/// back; the caller then tells [`Hooks::answered`].
pub fn client_message(hooks: &mut Hooks, ids: &[&str], message: &Message<'_>, replies: Replies) {
    let has_http = hooks.http().is_some_and(|h| h.publish.is_some());
    if !has_http && hooks.lcf.postgres_on_publish.is_none() {
        return;
    }
    let p = hooks.publishing.get_or_insert_with(|| {
        Box::new(Publishing {
            pending: Vec::new(),
            queue: VecDeque::new(),
            inflight: None,
            replies: replies.clone(),
        })
    });
    if has_http {
        if p.queue.len() >= MAX_QUEUED {
            let log = hooks.server.as_ref().map_or(ptr::null_mut(), Server::log);
            ngx::ngx_log_error!(
                nginx_sys::NGX_LOG_WARN,
                log,
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
            hooks.next_publish();
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
    if let Some(p) = hooks.publishing.as_mut() {
        p.pending.extend(calls);
    }
}

impl Hooks {
    /// The SQL hooks' extra values of one hook.
    fn values(&self, name: &str) -> Vec<Option<String>> {
        let lcf = self.lcf;
        let (n_sub, n_unsub) =
            (count(&lcf.postgres_on_subscribe), count(&lcf.postgres_on_unsubscribe));
        let (skip, take) = match name {
            ON_SUBSCRIBE => (0, n_sub),
            ON_UNSUBSCRIBE => (n_sub, n_unsub),
            _ => (n_sub + n_unsub, count(&lcf.postgres_on_publish)),
        };
        Kept::parts(&self.kept)
            .skip(skip)
            .take(take)
            .map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// The HTTP hooks' parts, when the location has HTTP hooks.
    fn http(&self) -> Option<HttpParts<'_>> {
        http_parts(self.lcf, &self.kept, self.server.as_ref())
    }

    /// Starts the next queued HTTP publish call, if none is running.
    fn next_publish(&mut self) {
        let Some(http) = http_parts(self.lcf, &self.kept, self.server.as_ref()) else { return };
        let Some(target) = http.publish else { return };
        let Some(p) = self.publishing.as_mut() else { return };
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
                http::call(&http.origin, PUBLISH, target, http.args, Some(body), Some(done))
            {
                p.inflight = Some(c);
                return;
            }
        }
    }

    /// Runs one SQL hook once per channel; returns the ids of calls that want rows.
    fn run(
        &self,
        name: &'static str,
        ids: &[&str],
        message: Option<String>,
        reply: Option<&dyn Fn() -> HookReply>,
    ) -> Vec<u64> {
        let lcf = self.lcf;
        let hook = match name {
            ON_SUBSCRIBE => &lcf.postgres_on_subscribe,
            ON_UNSUBSCRIBE => &lcf.postgres_on_unsubscribe,
            _ => &lcf.postgres_on_publish,
        };
        let Some(hook) = hook else { return Vec::new() };
        let values = self.values(name);
        worker::with(|w| {
            let mut calls = Vec::new();
            for id in ids {
                let mut params = Vec::with_capacity(2 + values.len());
                params.push(Some((*id).to_string()));
                params.push(message.clone());
                params.extend(values.iter().cloned());
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
        let Some(p) = self.publishing.as_mut() else { return };
        match answer {
            Answer::Sql { id, .. } => p.pending.retain(|x| x != id),
            Answer::Http(_) => {
                p.inflight = None;
                self.next_publish();
            }
        }
    }
}

/// The parts of `kept` that the HTTP hooks use.
fn http_parts<'a>(
    lcf: &'static LocConf,
    kept: &'a [u8],
    server: Option<&'a Server>,
) -> Option<HttpParts<'a>> {
    let server = server?;
    let n = count(&lcf.postgres_on_subscribe)
        + count(&lcf.postgres_on_unsubscribe)
        + count(&lcf.postgres_on_publish);
    let mut parts = Kept::parts(kept).skip(n);
    let mut next = || parts.next().flatten();
    let (sockaddr, local_sockaddr, addr_text) = (next()?, next()?, next()?);
    let args = next()?;
    let (unsub, publish) = (next(), next());
    Some(HttpParts {
        origin: Origin { server, sockaddr, local_sockaddr, addr_text },
        args,
        unsubscribed: target_or(unsub, lcf.client_unsubscribed_request),
        publish: target_or(publish, lcf.client_publish_request),
    })
}

/// A target kept for this subscriber, or the configuration's when it has no variables.
fn target_or(kept: Option<&[u8]>, cv: *mut ngx_http_complex_value_t) -> Option<&[u8]> {
    kept.or_else(|| if is_static(cv) { static_value(cv) } else { None })
}
