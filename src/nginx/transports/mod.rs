//! Subscriber transports. Each one owns its connection and plugs into the subscription
//! lifecycle through [`crate::nginx::lifecycle::Transport`]; adding one is a file here and
//! a line in [`handler`].

pub mod connection;
pub mod longpoll;
pub mod parked;
pub mod polling;

use nginx_sys::{ngx_http_request_t, ngx_int_t};

use crate::config::values::SubscriberMode;
use crate::nginx::http;

/// The content handler of `push_stream_subscriber` locations.
pub extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed
    let r = unsafe { &mut *r };
    let mut mode = http::loc_conf(r).subscriber;
    if mode != Some(SubscriberMode::WebSocket) {
        // push-stream's X-Nginx-PushStream-Mode: polling or long-polling on request (a
        // long-polling location stays long-polling)
        match http::header_in(r, "X-Nginx-PushStream-Mode").map(<[u8]>::to_ascii_lowercase) {
            Some(m) if m == b"long-polling" => mode = Some(SubscriberMode::LongPolling),
            Some(m) if m == b"polling" && mode != Some(SubscriberMode::LongPolling) => {
                mode = Some(SubscriberMode::Polling)
            }
            _ => {}
        }
        // as push-stream: CORS, and OPTIONS answered before anything else
        if http::cors(r, "GET").is_err() {
            return nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
        if r.method == nginx_sys::NGX_HTTP_OPTIONS as usize {
            return http::send_header_only(r, nginx_sys::NGX_HTTP_OK);
        }
    }
    let result = match mode {
        Some(SubscriberMode::WebSocket) => connection::subscribe(r, None),
        Some(SubscriberMode::Streaming) => connection::subscribe(r, Some(false)),
        Some(SubscriberMode::EventSource) => connection::subscribe(r, Some(true)),
        Some(SubscriberMode::LongPolling) => long_polling(r, false),
        Some(SubscriberMode::Polling) | None => long_polling(r, true),
    };
    match result {
        Ok(rc) | Err(rc) => rc,
    }
}

/// `long-polling`: a GET whose channels are valid waits for the next message; `polling`
/// is answered at once.
fn long_polling(r: &mut ngx_http_request_t, polling: bool) -> Result<ngx_int_t, ngx_int_t> {
    if r.method != nginx_sys::NGX_HTTP_GET as usize {
        return Ok(http::send_not_allowed(r, "GET"));
    }
    // SAFETY: the request is in its content phase
    let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
    if rc != nginx_sys::NGX_OK as ngx_int_t {
        return Ok(rc);
    }
    if !polling {
        if let Some(rc) = longpoll::replayed(r) {
            return Ok(rc);
        }
    }
    match connection::path_channels(r) {
        Ok(channels) if polling => longpoll::poll(r, channels),
        Ok(channels) => longpoll::subscribe(r, channels),
        Err(e) => Ok(http::send_explain(r, e.status().into(), &e.to_string())),
    }
}
