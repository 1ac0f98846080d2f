//! Small request helpers shared by the subscriber and publisher handlers.

use core::ptr;

use nginx_sys::{
    ngx_buf_t, ngx_chain_t, ngx_http_complex_value_t, ngx_http_request_t, ngx_int_t, ngx_str_t,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf};

use crate::nginx::conf::{LocConf, MainConf};
use crate::nginx::HttpPgPushModule;
use crate::protocol::channels::Limits;

pub const OK: ngx_int_t = nginx_sys::NGX_OK as ngx_int_t;
pub const ERROR: ngx_int_t = nginx_sys::NGX_ERROR as ngx_int_t;
pub const DONE: ngx_int_t = nginx_sys::NGX_DONE as ngx_int_t;

/// push-stream's header for why a request was refused.
pub const EXPLAIN: &str = "X-Nginx-PushStream-Explain";

pub fn loc_conf(r: &ngx_http_request_t) -> &'static LocConf {
    // SAFETY: our handlers only run in locations where this module's conf exists
    let r = unsafe { ngx::http::Request::from_ngx_http_request(ptr::from_ref(r).cast_mut()) };
    HttpPgPushModule::location_conf(r).expect("pgpush location conf")
}

pub fn main_conf(r: &ngx_http_request_t) -> &'static MainConf {
    // SAFETY: as above
    let r = unsafe { ngx::http::Request::from_ngx_http_request(ptr::from_ref(r).cast_mut()) };
    HttpPgPushModule::main_conf(r).expect("pgpush main conf")
}

/// The first request header called `name` (case-insensitive).
pub fn header_in<'a>(r: &'a ngx_http_request_t, name: &str) -> Option<&'a [u8]> {
    // SAFETY: headers_in.headers is a list of ngx_table_elt_t for the request's life
    let list = unsafe { ngx::http::list_iterator(&r.headers_in.headers) };
    for (k, v) in list {
        if k.as_bytes().eq_ignore_ascii_case(name.as_bytes()) {
            return Some(v.as_bytes());
        }
    }
    None
}

/// A query argument, unescaped.
pub fn arg(r: &ngx_http_request_t, name: &[u8]) -> Option<Vec<u8>> {
    let args = r.args.as_bytes();
    args.split(|&b| b == b'&').find_map(|kv| {
        let (k, v) = kv.split_at(kv.iter().position(|&b| b == b'=')?);
        (k == name && v.len() > 1).then(|| crate::protocol::channels::unescape(&v[1..]))
    })
}

/// Sets the response's content type to JSONP's.
pub fn set_javascript(r: &mut ngx_http_request_t) {
    const JS: &str = "application/javascript";
    r.headers_out.content_type =
        nginx_sys::ngx_str_t { len: JS.len(), data: JS.as_ptr().cast_mut() };
    r.headers_out.content_type_len = JS.len();
}

/// Adds a response header (allocated from the request pool).
pub fn header_out(r: &mut ngx_http_request_t, name: &str, value: &str) -> Result<(), ()> {
    // SAFETY: headers_out.headers is the request's list; the pool outlives it
    let req = unsafe { ngx::http::Request::from_ngx_http_request(r) };
    req.add_header_out(name, value).ok_or(())
}

/// Evaluates a complex value (such as `push_stream_channels_path $arg_id`).
pub fn complex_value(
    r: &mut ngx_http_request_t,
    cv: *mut ngx_http_complex_value_t,
) -> Option<Vec<u8>> {
    if cv.is_null() {
        return None;
    }
    let mut v = ngx_str_t { len: 0, data: ptr::null_mut() };
    // SAFETY: cv was compiled at configuration time; v receives pool memory
    if unsafe { nginx_sys::ngx_http_complex_value(r, cv, &mut v) } != 0 {
        return None;
    }
    Some(v.as_bytes().to_vec())
}

/// The request's channels path (`push_stream_channels_path`, evaluated) and the limits
/// every channel id of it must meet.
pub fn channels_path(r: &mut ngx_http_request_t) -> (Vec<u8>, Limits<'static>) {
    let lcf = loc_conf(r);
    let mcf = main_conf(r);
    let path = complex_value(r, lcf.channels_path).unwrap_or_default();
    let limits = Limits {
        max_id_length: MainConf::limit(mcf.max_channel_id_length),
        pg_prefix: mcf.channel_prefix(),
    };
    (path, limits)
}

/// The node-wide limits on channels; `subscriber` adds the location's
/// `push_stream_authorized_channels_only` and the subscribers limit.
pub fn counter_limits(r: &ngx_http_request_t, subscriber: bool) -> crate::counters::Limits {
    let mcf = main_conf(r);
    crate::counters::Limits {
        max_channels: MainConf::limit(mcf.max_number_of_channels),
        max_wildcard_channels: MainConf::limit(mcf.max_number_of_wildcard_channels),
        max_subscribers: MainConf::limit(mcf.max_subscribers_per_channel).filter(|_| subscriber),
        existing_only: subscriber && loc_conf(r).authorized_channels_only != 0,
    }
}

/// The module's main configuration, without a request (from the worker's cycle).
pub fn cycle_main_conf() -> Option<&'static MainConf> {
    // SAFETY: ngx_cycle is set in every process that runs handlers
    let cycle = unsafe { nginx_sys::ngx_cycle.as_ref()? };
    HttpPgPushModule::main_conf(cycle)
}

/// The headers push-stream lets a browser send across origins.
pub const CORS_HEADERS: &str =
    "If-Modified-Since,If-None-Match,Etag,Event-Id,Event-Type,Last-Event-Id";

/// `push_stream_allowed_origins`: when it evaluates to a value, the CORS headers for these
/// methods are added to the response, and the value is returned (for heads written by
/// hand). `Err` if a header could not be added.
pub fn cors(r: &mut ngx_http_request_t, methods: &str) -> Result<Option<String>, ()> {
    let Some(origin) = allowed_origin(r) else {
        return Ok(None);
    };
    header_out(r, "Access-Control-Allow-Origin", &origin)?;
    header_out(r, "Access-Control-Allow-Methods", methods)?;
    header_out(r, "Access-Control-Allow-Headers", CORS_HEADERS)?;
    Ok(Some(origin))
}

/// What `push_stream_allowed_origins` evaluates to for this request, if anything.
pub fn allowed_origin(r: &mut ngx_http_request_t) -> Option<String> {
    let cv = loc_conf(r).allowed_origins;
    let origin = complex_value(r, cv).filter(|v| !v.is_empty())?;
    Some(String::from_utf8_lossy(&origin).into_owned())
}

/// push-stream's headers that keep every answer out of caches.
pub fn no_cache(r: &mut ngx_http_request_t) -> Result<(), ()> {
    header_out(r, "Expires", "Thu, 01 Jan 1970 00:00:01 GMT")?;
    header_out(r, "Cache-Control", "no-cache, no-store, must-revalidate")
}

/// A header-only answer with this status.
pub fn send_header_only(r: &mut ngx_http_request_t, status: u32) -> ngx_int_t {
    r.headers_out.status = status as _;
    r.headers_out.content_length_n = 0;
    r.set_header_only(1);
    // SAFETY: a request being answered for the first time
    unsafe { nginx_sys::ngx_http_send_header(r) }
}

/// A header-only answer with push-stream's explanation header, as its handlers give.
pub fn send_explain(r: &mut ngx_http_request_t, status: u32, explain: &str) -> ngx_int_t {
    r.headers_out.status = status as _;
    r.headers_out.content_length_n = 0;
    r.set_header_only(1);
    if header_out(r, EXPLAIN, explain).is_err() {
        return ERROR;
    }
    // SAFETY: a request being answered for the first time
    unsafe { nginx_sys::ngx_http_send_header(r) }
}

/// `405` with the methods this location takes.
pub fn send_not_allowed(r: &mut ngx_http_request_t, allow: &str) -> ngx_int_t {
    r.headers_out.status = nginx_sys::NGX_HTTP_NOT_ALLOWED as _;
    r.headers_out.content_length_n = 0;
    r.set_header_only(1);
    if header_out(r, "Allow", allow).is_err() {
        return ERROR;
    }
    // SAFETY: as above
    unsafe { nginx_sys::ngx_http_send_header(r) }
}

/// A complete response with a body copied into the request pool.
pub fn send_body(
    r: &mut ngx_http_request_t,
    status: u32,
    content_type: &'static str,
    body: &[u8],
) -> ngx_int_t {
    r.headers_out.content_type =
        ngx_str_t { len: content_type.len(), data: content_type.as_ptr().cast_mut() };
    r.headers_out.content_type_len = content_type.len();
    send_typed_body(r, status, body)
}

/// Like [`send_body`], with the content type already set on the request.
pub fn send_typed_body(r: &mut ngx_http_request_t, status: u32, body: &[u8]) -> ngx_int_t {
    r.headers_out.content_length_n = body.len() as _;
    send_unsized_body(r, status, body)
}

/// The same without a `Content-Length`: chunked for HTTP/1.1 (and so open to gzip
/// whatever its size), as push-stream answers its pollers.
pub fn send_unsized_body(r: &mut ngx_http_request_t, status: u32, body: &[u8]) -> ngx_int_t {
    r.headers_out.status = status as _;
    // SAFETY: a request being answered for the first time
    let rc = unsafe { nginx_sys::ngx_http_send_header(r) };
    if rc == ERROR || rc > OK || r.header_only() != 0 {
        return rc;
    }
    // SAFETY: the buffer lives in the request pool until the request is freed
    unsafe {
        let b = nginx_sys::ngx_create_temp_buf(r.pool, body.len().max(1));
        if b.is_null() {
            return ERROR;
        }
        let b: &mut ngx_buf_t = &mut *b;
        ptr::copy_nonoverlapping(body.as_ptr(), b.last, body.len());
        b.last = b.last.add(body.len());
        b.set_last_buf(u32::from(ptr::eq(r, r.main)));
        b.set_last_in_chain(1);
        let mut out = ngx_chain_t { buf: b, next: ptr::null_mut() };
        nginx_sys::ngx_http_output_filter(r, &mut out)
    }
}

/// Finalizes a request from outside nginx's request handler (timers, the bridge), which
/// also has to run what the finalization posted.
pub fn finalize(r: *mut ngx_http_request_t, rc: ngx_int_t) {
    // SAFETY: r is alive until this call; c stays readable afterwards (nginx's own
    // handlers rely on c->destroyed the same way)
    unsafe {
        let c = (*r).connection;
        nginx_sys::ngx_http_finalize_request(r, rc);
        nginx_sys::ngx_http_run_posted_requests(c);
    }
}

/// A resume position's value: the location's variable (`push_stream_last_event_id`,
/// `_last_received_message_time`, `_tag`) when it has one, else the request header.
pub fn position_value(
    r: &mut ngx_http_request_t,
    cv: *mut nginx_sys::ngx_http_complex_value_t,
    header: &str,
) -> Option<Vec<u8>> {
    if cv.is_null() || cv == crate::nginx::conf::NGX_CONF_UNSET_PTR {
        header_in(r, header).filter(|v| !v.is_empty()).map(<[u8]>::to_vec)
    } else {
        complex_value(r, cv)
            .filter(|v| !v.is_empty())
            .map(|v| crate::protocol::channels::unescape(&v))
    }
}

/// The client's position: the time (`-1` if none) and the tag, from `If-Modified-Since`
/// and `If-None-Match` or their variables.
pub fn position(r: &mut ngx_http_request_t) -> (nginx_sys::time_t, Option<u64>) {
    let lcf = loc_conf(r);
    let time = position_value(r, lcf.last_received_message_time, "If-Modified-Since")
        .map(|mut v| {
            // SAFETY: the parser reads len bytes
            unsafe { nginx_sys::ngx_parse_http_time(v.as_mut_ptr(), v.len()) }
        })
        .unwrap_or(-1);
    let tag = position_value(r, lcf.last_received_message_tag, "If-None-Match")
        .and_then(|v| crate::protocol::stream::parse_tag(&v));
    (time, tag)
}
