//! `push_stream_publisher`: `POST`/`PUT` publishes the body to the channel; `GET` answers
//! the channel's info.
//!
//! With `push_stream_postgres`, a publish is a `pg_notify` sent by the worker's side
//! connection (batched with concurrent ones), and the answer waits for its commit: every
//! worker of every node then delivers it through LISTEN. Without PostgreSQL (one worker),
//! the message is delivered here directly.

use core::ffi::c_void;
use core::ptr;
use std::cell::RefCell;
use std::rc::Rc;

use nginx_sys::{
    ngx_http_request_t, ngx_int_t, NGX_HTTP_GET, NGX_HTTP_POST, NGX_HTTP_PUT,
    NGX_HTTP_SPECIAL_RESPONSE,
};

use crate::config::values::PublisherMode;
use crate::counters::{Info, Refusal};
use crate::nginx::events::{self, Event};
use crate::nginx::http::{self, finalize, DONE, ERROR, OK};
use crate::nginx::{lifecycle, stats, worker, zone};
use crate::protocol::channels;
use crate::protocol::payload::{self, Meta, MAX_PAYLOAD};

pub extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed
    let r = unsafe { &mut *r };
    let admin = http::loc_conf(r).publisher == Some(PublisherMode::Admin);
    let allow = if admin { "GET, POST, PUT, DELETE" } else { "GET, POST, PUT" };
    // as push-stream: no-cache headers, then CORS, then OPTIONS
    if http::no_cache(r).is_err() || http::cors(r, allow).is_err() {
        return ERROR;
    }
    let method = r.method as u32;
    let publish = method == NGX_HTTP_POST || method == NGX_HTTP_PUT;
    let delete = method == nginx_sys::NGX_HTTP_DELETE;
    match method {
        nginx_sys::NGX_HTTP_OPTIONS => return http::send_header_only(r, nginx_sys::NGX_HTTP_OK),
        NGX_HTTP_POST | NGX_HTTP_PUT | NGX_HTTP_GET => {}
        nginx_sys::NGX_HTTP_DELETE if admin => {}
        _ => return http::send_not_allowed(r, allow),
    }
    let ids = match channel_ids(r) {
        Ok(ids) => ids,
        Err(rc) => return rc,
    };
    if (publish || delete) && ids.iter().any(|id| events::is_events_channel(id.as_bytes())) {
        return refuse(r, 403, "Only internal routines can change events channel.");
    }
    if publish {
        // push-stream creates the channels before it looks at the body
        let limits = http::counter_limits(r, false);
        for id in &ids {
            match zone::touch(id.as_bytes(), &limits) {
                Ok(true) => events::emit(Event::ChannelCreated, id.as_bytes()),
                Ok(false) | Err(Refusal::Full) => {}
                Err(_) => return refuse(r, 403, "Number of channels were exceeded."),
            }
        }
    }
    if publish || delete {
        // a DELETE's body is the text its subscribers get
        r.set_request_body_in_single_buf(1);
        // SAFETY: the request is in its content phase; on_body finalizes it
        let rc = unsafe { nginx_sys::ngx_http_read_client_request_body(r, Some(on_body)) };
        if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
            return rc;
        }
        return DONE;
    }
    // SAFETY: as above
    let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
    if rc != OK {
        return rc;
    }
    send_info(r, &ids, true)
}

/// An error answer that drops whatever body the client sent.
fn refuse(r: &mut ngx_http_request_t, status: u32, explain: &str) -> ngx_int_t {
    // SAFETY: the request is in its content phase
    let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
    if rc != OK {
        return rc;
    }
    http::send_explain(r, status, explain)
}

extern "C" fn on_body(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls this once the body is read; the request is alive
    let req = unsafe { &mut *r };
    let answer = if req.method == nginx_sys::NGX_HTTP_DELETE as usize {
        Some(delete(req))
    } else {
        publish(req)
    };
    if let Some(rc) = answer {
        // SAFETY: the body handler owns the request's finalization
        unsafe { nginx_sys::ngx_http_finalize_request(r, rc) };
    }
}

/// The channel ids of the request's path (`a/b` is two), or the answer already sent.
fn channel_ids(r: &mut ngx_http_request_t) -> Result<Vec<String>, ngx_int_t> {
    let (value, limits) = http::channels_path(r);
    match channels::parse_path(&value, limits) {
        Ok(list) => Ok(list.into_iter().map(|c| c.id).collect()),
        Err(e) => Err(refuse(r, e.status().into(), &e.to_string())),
    }
}

/// The publishes of one request still waiting for PostgreSQL.
struct Pending {
    r: *mut ngx_http_request_t,
    ids: Vec<String>,
    /// Publish ids (the worker's) still out.
    out: Vec<u64>,
    failed: Option<String>,
}

/// Publishes the body to every channel of the path; `None` while PostgreSQL has them.
fn publish(r: &mut ngx_http_request_t) -> Option<ngx_int_t> {
    let ids = match channel_ids(r) {
        Ok(ids) => ids,
        Err(rc) => return Some(rc),
    };
    let body = match body(r) {
        Ok(b) => b,
        Err(()) => return Some(ERROR),
    };
    if body.is_empty() {
        return Some(http::send_explain(r, 400, "Empty post requests are not allowed."));
    }
    // Event-Id and Event-Type travel with the message; any bytes are a message (text that
    // is not UTF-8 goes as binary)
    let meta_header = |r: &ngx_http_request_t, name| {
        http::header_in(r, name)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let meta = Meta {
        event_id: meta_header(r, "Event-Id"),
        event_type: meta_header(r, "Event-Type"),
        ..Meta::default()
    };
    let payload = match String::from_utf8(body) {
        Ok(text) => payload::wrap_text_with(&text, &meta),
        Err(e) => payload::wrap_binary_with(e.as_bytes(), &meta),
    };
    let prefix = http::main_conf(r).channel_prefix();
    // channels too long for an identifier carry their id in the payload
    let each: Vec<(String, String)> = ids
        .iter()
        .map(|id| {
            let pg = channels::pg_channel(prefix, id);
            let notified = payload::for_channel(&pg, id, &payload);
            (pg, notified)
        })
        .collect();
    // a stored message has no size limit: a notification too small for it names its row
    let stored =
        http::loc_conf(r).store_messages == 1 && worker::with(|w| w.store).unwrap_or(false);
    if !stored && each.iter().any(|(_, p)| p.len() > MAX_PAYLOAD) {
        let explain = format!(
            "Message is too large: a PostgreSQL notification carries at most {MAX_PAYLOAD} bytes."
        );
        return Some(http::send_explain(r, 413, &explain));
    }

    if !worker::with(|w| w.has_postgres()).unwrap_or(false) {
        // one worker, no PostgreSQL: deliver here and now
        for ((pg, _), id) in each.iter().zip(&ids) {
            counted(id);
            lifecycle::deliver(pg, &payload);
        }
        lifecycle::settle();
        return Some(published(r, &ids));
    }

    if each.iter().any(|(pg, _)| zone::listen_pending(channels::listen_name(pg).as_bytes()))
        && wait_for_listens(r)
    {
        return None;
    }

    let rp = ptr::from_mut(r);
    let pending = Rc::new(RefCell::new(Pending { r: rp, ids, out: Vec::new(), failed: None }));
    for (k, (pg, notified)) in each.into_iter().enumerate() {
        let p = pending.clone();
        let done = Box::new(move |pid, outcome: Result<i64, &str>| answer(&p, k, pid, outcome));
        let pid = worker::with(|w| w.publish(pg, notified, stored, done))?;
        pending.borrow_mut().out.push(pid);
    }

    // SAFETY: pool memory for the shared state, freed with the request
    let cln =
        unsafe { nginx_sys::ngx_http_cleanup_add(r, core::mem::size_of::<Rc<RefCell<Pending>>>()) };
    if cln.is_null() {
        forget_all(&pending);
        return Some(ERROR);
    }
    // SAFETY: data has room for the Rc (pool allocations are aligned)
    unsafe {
        (*cln).data.cast::<Rc<RefCell<Pending>>>().write(pending);
        (*cln).handler = Some(forget);
    }
    None
}

/// How long a publish waits, at most, for LISTENs in flight on its channels.
const LISTEN_WAIT_MS: i64 = 250;
/// How often it looks again.
const LISTEN_RECHECK_MS: nginx_sys::ngx_msec_t = 2;

/// A subscriber of this node was admitted to one of the channels and its worker's LISTEN
/// is not confirmed yet: a notification now could miss it, where push-stream (one shared
/// memory) would deliver. The publish waits for it, a bounded while from the request's
/// start; whether it does.
fn wait_for_listens(r: &mut ngx_http_request_t) -> bool {
    // SAFETY: nginx's cached time is always set
    let (sec, msec) =
        unsafe { ((*nginx_sys::ngx_cached_time).sec, (*nginx_sys::ngx_cached_time).msec) };
    let waited = (sec - r.start_sec) * 1000 + (msec as i64 - r.start_msec as i64);
    if waited >= LISTEN_WAIT_MS {
        return false;
    }
    r.write_event_handler = Some(listens_rechecked);
    // SAFETY: the request's connection, alive while the request waits
    unsafe { nginx_sys::ngx_add_timer((*r.connection).write, LISTEN_RECHECK_MS) };
    true
}

/// The request's write handler while it waits for LISTENs: its timer looks again.
extern "C" fn listens_rechecked(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls this with a live request whose connection is alive
    let req = unsafe { &mut *r };
    let wev = unsafe { &mut *(*req.connection).write };
    if wev.timedout() == 0 {
        return;
    }
    wev.set_timedout(0);
    req.write_event_handler = Some(nginx_sys::ngx_http_request_empty_handler);
    if let Some(rc) = publish(req) {
        // SAFETY: as in on_body: the publish owns the request's finalization
        unsafe { nginx_sys::ngx_http_finalize_request(r, rc) };
    }
}

fn forget_all(pending: &Rc<RefCell<Pending>>) {
    let out = std::mem::take(&mut pending.borrow_mut().out);
    worker::with(|w| out.into_iter().for_each(|pid| drop(w.take_publish(pid))));
}

/// The request went away before PostgreSQL answered.
extern "C" fn forget(data: *mut c_void) {
    // SAFETY: data holds the Rc written in publish(), read once
    let pending = unsafe { data.cast::<Rc<RefCell<Pending>>>().read() };
    forget_all(&pending);
}

/// PostgreSQL answered one of the request's publishes (or the worker is going away); the
/// client is answered once all have.
fn answer(p: &Rc<RefCell<Pending>>, k: usize, pid: u64, outcome: Result<i64, &str>) {
    let (r, ids, failed) = {
        let mut st = p.borrow_mut();
        st.out.retain(|&x| x != pid);
        match outcome {
            Ok(kept) => {
                counted(&st.ids[k]);
                // SAFETY: a waiting request is alive
                if http::loc_conf(unsafe { &*st.r }).store_messages == 1 {
                    zone::stored(st.ids[k].as_bytes(), kept);
                }
            }
            Err(why) => {
                st.failed.get_or_insert_with(|| why.to_string());
            }
        }
        if !st.out.is_empty() {
            return;
        }
        (st.r, std::mem::take(&mut st.ids), st.failed.take())
    };
    // SAFETY: a waiting request is alive: its cleanup forgets the publishes
    let req = unsafe { &mut *r };
    let rc = match failed {
        Some(why) => http::send_explain(req, 503, &format!("Message not published: {why}.")),
        None => published(req, &ids),
    };
    finalize(r, rc);
}

/// A message was published on the channel (which that may have created).
fn counted(id: &str) {
    if zone::published(id.as_bytes(), true) {
        events::emit(Event::ChannelCreated, id.as_bytes());
    }
}

/// The answer to a publish: the channels' info, or a header-only 200 with
/// `push_stream_channel_info_on_publish off`.
fn published(r: &mut ngx_http_request_t, ids: &[String]) -> ngx_int_t {
    if http::loc_conf(r).channel_info_on_publish == 0 {
        return http::send_header_only(r, nginx_sys::NGX_HTTP_OK);
    }
    send_info(r, ids, false)
}

/// push-stream's channel info: one channel's, or a group when the path names several;
/// with `only_existing` (a GET), channels that do not exist are left out, and none is 404.
fn send_info(r: &mut ngx_http_request_t, ids: &[String], only_existing: bool) -> ngx_int_t {
    let infos: Vec<Info> = ids
        .iter()
        .filter_map(|id| {
            let found = zone::info(id.as_bytes());
            match found {
                None if !only_existing => Some(Info {
                    id: id.as_bytes().to_vec(),
                    published: 0,
                    stored: 0,
                    subscribers: 0,
                    wildcard: false,
                }),
                other => other,
            }
        })
        .collect();
    stats::send_infos(r, &infos, ids.len() > 1)
}

/// Admin `DELETE`: the channels' subscribers, on every worker and node, get the deleted
/// message (the body, or `push_stream_channel_deleted_message_text`) and leave them.
fn delete(r: &mut ngx_http_request_t) -> ngx_int_t {
    let ids = match channel_ids(r) {
        Ok(ids) => ids,
        Err(rc) => return rc,
    };
    let Ok(body) = body(r) else { return ERROR };
    let text = if body.is_empty() {
        http::main_conf(r).channel_deleted_message_text.as_bytes().to_vec()
    } else {
        body
    };
    let mut existing = Vec::new();
    for id in &ids {
        match zone::delete(id.as_bytes()) {
            // a channel with subscribers is destroyed when the last one has left
            Some(true) => events::emit(Event::ChannelDestroyed, id.as_bytes()),
            Some(false) => {}
            None => continue,
        }
        existing.push(id);
    }
    if existing.is_empty() {
        return http::send_header_only(r, nginx_sys::NGX_HTTP_NOT_FOUND);
    }
    let payload = payload::wrap_deleted(&text);
    let prefix = http::main_conf(r).channel_prefix();
    let postgres = worker::with(|w| w.has_postgres()).unwrap_or(false);
    // with a store, the channel's history goes too
    let stored = http::loc_conf(r).store_messages == 1;
    for id in existing {
        let pg = channels::pg_channel(prefix, id);
        if postgres {
            let notified = payload::for_channel(&pg, id, &payload);
            // the answer does not wait: the channel is gone from this node's counts already
            worker::with(|w| w.publish(pg, notified, stored, Box::new(|_, _| {})));
        } else {
            lifecycle::deliver(&pg, &payload);
        }
    }
    lifecycle::settle();
    http::send_explain(r, 200, "Channel deleted.")
}
/// The request body, from memory or from nginx's temporary file.
fn body(r: &ngx_http_request_t) -> Result<Vec<u8>, ()> {
    let mut out = Vec::new();
    // SAFETY: the body chain is complete when the body handler runs
    unsafe {
        let Some(rb) = r.request_body.as_ref() else {
            return Ok(out);
        };
        let mut cl = rb.bufs;
        while let Some(link) = cl.as_ref() {
            let b = &*link.buf;
            if b.in_file() != 0 && !b.file.is_null() {
                let len = (b.file_last - b.file_pos) as usize;
                let start = out.len();
                out.resize(start + len, 0);
                let n = libc::pread(
                    (*b.file).fd,
                    out[start..].as_mut_ptr().cast(),
                    len,
                    b.file_pos as libc::off_t,
                );
                if n != len as isize {
                    return Err(());
                }
            } else if !b.pos.is_null() {
                out.extend_from_slice(core::slice::from_raw_parts(
                    b.pos,
                    b.last.offset_from(b.pos) as usize,
                ));
            }
            cl = link.next;
        }
    }
    Ok(out)
}
