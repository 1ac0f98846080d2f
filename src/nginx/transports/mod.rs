//! Subscriber transports. Each one owns its connection and plugs into the subscription
//! lifecycle through [`crate::nginx::lifecycle::Transport`]; adding one is a file here and
//! a line in [`handler`].

pub mod connection;

use nginx_sys::{ngx_http_request_t, ngx_int_t};

use crate::config::values::SubscriberMode;
use crate::nginx::http;

/// The content handler of `push_stream_subscriber` locations.
pub extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed
    let r = unsafe { &mut *r };
    let result = match http::loc_conf(r).subscriber {
        Some(SubscriberMode::WebSocket) => connection::subscribe(r, None),
        Some(SubscriberMode::Streaming) => connection::subscribe(r, Some(false)),
        Some(SubscriberMode::EventSource) => connection::subscribe(r, Some(true)),
        _ => Ok(nginx_sys::NGX_HTTP_NOT_IMPLEMENTED as ngx_int_t),
    };
    match result {
        Ok(rc) | Err(rc) => rc,
    }
}
