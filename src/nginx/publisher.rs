//! `push_stream_publisher`: `POST`/`PUT` publishes the body to the channel; `GET` answers
//! the channel's info.
//!
//! With `push_stream_postgres`, a publish is a `pg_notify` sent by the worker's side
//! connection (batched with concurrent ones), and the answer waits for its commit: every
//! worker of every node then delivers it through LISTEN. Without PostgreSQL (one worker),
//! the message is delivered here directly.

use core::ffi::c_void;
use core::ptr;

use nginx_sys::{
    ngx_http_request_t, ngx_int_t, NGX_HTTP_GET, NGX_HTTP_POST, NGX_HTTP_PUT,
    NGX_HTTP_SPECIAL_RESPONSE,
};

use crate::config::values::PG_MAX_IDENTIFIER;
use crate::nginx::http::{self, finalize, DONE, ERROR, OK};
use crate::nginx::{lifecycle, worker};
use crate::protocol::channels;
use crate::protocol::payload::{self, Meta, MAX_PAYLOAD};

pub extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed
    let r = unsafe { &mut *r };
    // as push-stream: no-cache headers, then CORS, then OPTIONS
    if http::no_cache(r).is_err() || http::cors(r, "GET, POST, PUT").is_err() {
        return ERROR;
    }
    match r.method as u32 {
        nginx_sys::NGX_HTTP_OPTIONS => http::send_header_only(r, nginx_sys::NGX_HTTP_OK),
        NGX_HTTP_POST | NGX_HTTP_PUT => {
            r.set_request_body_in_single_buf(1);
            // SAFETY: the request is in its content phase; on_body finalizes it
            let rc = unsafe { nginx_sys::ngx_http_read_client_request_body(r, Some(on_body)) };
            if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
                return rc;
            }
            DONE
        }
        NGX_HTTP_GET => {
            // SAFETY: as above
            let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
            if rc != OK {
                return rc;
            }
            match channel(r) {
                Ok((pg, id)) => {
                    let (_, subscribers) = lifecycle::info(&pg);
                    if subscribers == 0 {
                        return http::send_explain(r, 404, "Channel not found.");
                    }
                    send_info(r, &pg, &id)
                }
                Err(rc) => rc,
            }
        }
        _ => http::send_not_allowed(r, "GET, POST, PUT"),
    }
}

extern "C" fn on_body(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls this once the body is read; the request is alive
    let req = unsafe { &mut *r };
    if let Some(rc) = publish(req) {
        // SAFETY: the body handler owns the request's finalization
        unsafe { nginx_sys::ngx_http_finalize_request(r, rc) };
    }
}

/// The channel of the request: (PostgreSQL name, id), or the answer already sent.
fn channel(r: &mut ngx_http_request_t) -> Result<(String, String), ngx_int_t> {
    let (value, limits) = http::channels_path(r);
    match channels::check_id(&channels::unescape(&value), limits) {
        Ok(id) => Ok((channels::pg_channel(limits.pg_prefix, &id), id)),
        Err(e) => Err(http::send_explain(r, e.status().into(), &e.to_string())),
    }
}

/// Publishes the body; `None` while PostgreSQL has the message.
fn publish(r: &mut ngx_http_request_t) -> Option<ngx_int_t> {
    let (pg, id) = match channel(r) {
        Ok(c) => c,
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
    let meta =
        Meta { event_id: meta_header(r, "Event-Id"), event_type: meta_header(r, "Event-Type") };
    let payload = match String::from_utf8(body) {
        Ok(text) => payload::wrap_text_with(&text, &meta),
        Err(e) => payload::wrap_binary_with(e.as_bytes(), &meta),
    };
    if payload.len() > MAX_PAYLOAD {
        let explain = format!(
            "Message is too large: a PostgreSQL notification carries at most {MAX_PAYLOAD} bytes."
        );
        return Some(http::send_explain(r, 413, &explain));
    }
    debug_assert!(pg.len() <= PG_MAX_IDENTIFIER);

    let rp = ptr::from_mut(r);
    let Some(Some(pid)) = worker::with(|w| {
        w.has_postgres().then(|| {
            let done = {
                let (pg, id) = (pg.clone(), id.clone());
                Box::new(move |_, outcome: Result<(), &str>| answer(rp, &pg, &id, outcome))
            };
            w.publish(pg.clone(), payload.clone(), done)
        })
    }) else {
        // one worker, no PostgreSQL: deliver here and now
        lifecycle::deliver(&pg, &payload);
        lifecycle::settle();
        return Some(published(r, &pg, &id));
    };

    // SAFETY: pool memory for the id, freed with the request
    let cln = unsafe { nginx_sys::ngx_http_cleanup_add(r, core::mem::size_of::<u64>()) };
    if cln.is_null() {
        worker::with(|w| w.take_publish(pid));
        return Some(ERROR);
    }
    // SAFETY: data has room for a u64 (pool allocations are aligned)
    unsafe {
        (*cln).data.cast::<u64>().write(pid);
        (*cln).handler = Some(forget);
    }
    None
}

/// The request went away before PostgreSQL answered.
extern "C" fn forget(data: *mut c_void) {
    // SAFETY: data holds the id written in publish()
    let id = unsafe { data.cast::<u64>().read() };
    worker::with(|w| w.take_publish(id));
}

/// PostgreSQL answered this publish (or the worker is going away).
fn answer(r: *mut ngx_http_request_t, pg: &str, id: &str, outcome: Result<(), &str>) {
    // SAFETY: a waiting request is alive: its cleanup forgets the publish
    let req = unsafe { &mut *r };
    let rc = match outcome {
        Err(why) => {
            let explain = format!("Message not published: {why}.");
            http::send_explain(req, 503, &explain)
        }
        Ok(()) => published(req, pg, id),
    };
    finalize(r, rc);
}

/// The answer to a publish: the channel info, or a header-only 200 with
/// `push_stream_channel_info_on_publish off`.
fn published(r: &mut ngx_http_request_t, pg: &str, id: &str) -> ngx_int_t {
    if http::loc_conf(r).channel_info_on_publish == 0 {
        return http::send_header_only(r, nginx_sys::NGX_HTTP_OK);
    }
    send_info(r, pg, id)
}

/// push-stream's channel info: `{"channel": "ID", "published_messages": N, ...}`.
fn send_info(r: &mut ngx_http_request_t, pg: &str, id: &str) -> ngx_int_t {
    let (messages, subscribers) = lifecycle::info(pg);
    let body = format!(
        "{{\"channel\": {}, \"published_messages\": {messages}, \"stored_messages\": 0, \
         \"subscribers\": {subscribers}}}\r\n",
        serde_json::Value::from(id)
    );
    http::send_body(r, 200, "application/json", body.as_bytes())
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
