//! `push_stream_subscriber websocket`, `streaming` and `eventsource`: subscribers that own
//! their connection once the response head is out.
//!
//! The head (a `101`, or a `200` for a stream) is sent only once every channel's LISTEN is
//! confirmed, so a message published after the client sees it is never missed. Messages
//! are encoded once per message and framing (WebSocket frames, or HTTP/1.1 chunks with
//! push-stream's EventSource lines) and shared by every subscriber (`Rc<[u8]>`); each
//! subscriber queues them and writes with the connection's `send_chain`, so several queued
//! frames leave in one `writev`. A stream that nginx's gzip filter claims shares its
//! messages unchunked, and each subscriber compresses (flushing each) and chunks them
//! itself, since its body bypasses the body filters. WebSocket client frames are read with tungstenite,
//! created on the first read so that idle subscribers carry no read buffer; a stream's
//! client only matters when it goes away.
//!
//! Output is bounded by `push_stream_subscriber_output_limit`: a subscriber whose unsent
//! backlog exceeds it when a message arrives is closed (WebSocket: 1013) with an error-log
//! line naming the channel. A single message larger than the limit still goes out.
//!
//! Once the head is out, the subscriber lets go of the HTTP request: the request is logged
//! and freed (its pool, headers and header buffer are several KB per connection), and the
//! bare connection is driven by this module's own read and write handlers until it
//! closes. Before that (while waiting for LISTEN), it is an ordinary held request. A
//! stream therefore needs HTTP/1.x (HTTP/2 gets `505`).

use core::ffi::c_void;
use core::ptr;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;

use flate2::write::GzEncoder;
use nginx_sys::{
    ngx_buf_t, ngx_chain_t, ngx_connection_t, ngx_event_t, ngx_http_cleanup_t,
    ngx_http_core_loc_conf_t, ngx_http_request_t, ngx_int_t, ngx_msec_t, ngx_posted_events,
    NGX_HTTP_CLOSE, NGX_HTTP_GET, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_LOG_ERR, NGX_LOG_INFO,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, NgxHttpCoreModule};
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

use crate::config::values;
use crate::counters::Refusal;
use crate::nginx::conf::{LocConf, MainConf};
use crate::nginx::events::{self, Event};
use crate::nginx::hooks;
use crate::nginx::http::{self, finalize, DONE, ERROR, OK};
use crate::nginx::lifecycle::{self, Encoding, SubKey, Subscription, Transport};
use crate::nginx::HttpPgPushModule;
use crate::nginx::{worker, zone};
use crate::postgres::cells::Reply;
use crate::protocol::channels::{self, ChannelError};
use crate::protocol::payload::{self, MAX_PAYLOAD};
use crate::protocol::stream;
use crate::protocol::template::Values;
use crate::protocol::websocket::{self as ws, close, HandshakeError, HandshakeRequest};

/// How long a closing connection waits for the client's close frame.
const CLOSE_TIMEOUT: ngx_msec_t = 5000;
/// Read buffer of a client that sends frames.
const READ_BUFFER: usize = 4096;
/// At most this many queued frames per `send_chain` call.
const IOV: usize = 64;
/// Client messages waiting for PostgreSQL before reading pauses.
const MAX_PENDING: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for LISTEN confirmations before answering 101.
    Handshake,
    Open,
    /// Our close frame is queued; waiting for the client's answer (or the timeout).
    /// Once the frame is out, a plain TCP connection is half-closed (`shut`) and input is
    /// read and dropped until the client's end, so that a client still sending (a message
    /// over the limit, say) reads our close code rather than a reset.
    Closing {
        answered: bool,
        shut: bool,
    },
    /// The client closed; our echo is queued.
    ClosingPeer,
    /// Finalize as soon as possible.
    Dead,
}

pub struct Subscriber {
    /// The request until the handshake is done, then null: the connection is ours.
    r: *mut ngx_http_request_t,
    cln: *mut ngx_http_cleanup_t,
    c: *mut ngx_connection_t,
    lcf: &'static LocConf,
    sub: Subscription,
    /// Until the 101 is sent.
    handshake: Option<Box<Handshake>>,
    state: State,
    out: Output,
    /// Created on the first client frame: idle subscribers carry no read state.
    reader: Option<Box<Reader>>,
    /// The connection's write timer counts down to the next ping (rather than bounding
    /// a send with `send_timeout`): an idle subscriber needs no event of its own.
    ping_timer: bool,
    /// The compressor of a gzipped stream, from its head to its end.
    gz: Option<Box<GzEncoder<Vec<u8>>>>,
    /// `send_timeout` and `client_max_body_size` (the largest client message) come from
    /// here.
    clcf: &'static ngx_http_core_loc_conf_t,
    framing: Framing,
}

/// How messages are framed on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    WebSocket,
    /// `streaming` or `eventsource`: an HTTP response of chunks (or plain bytes for an
    /// HTTP/1.0 client, which then reads to the end of the connection).
    Stream {
        eventsource: bool,
        chunked: bool,
        /// `push_stream_padding_by_user_agent`: the rule the client's user agent matched,
        /// from 1; 0 for none.
        padding: u8,
        /// nginx's gzip filter claimed the response: shared frames are the bare body,
        /// which each subscriber compresses (and then chunks) itself.
        gzip: bool,
    },
}

impl Framing {
    /// One message (text or binary) framed for the connection.
    fn frame(self, op: u8, data: &[u8], out: &mut Vec<u8>) {
        match self {
            Framing::WebSocket => ws::encode(op, data, out),
            Framing::Stream { chunked, gzip, .. } => stream::chunk(data, chunked && !gzip, out),
        }
    }
}

/// What only the handshake needs.
struct Handshake {
    accept: String,
    /// A channel error to report in a 1008 close frame right after the 101.
    refusal: Option<(u16, String)>,
    /// A stream's head, made by nginx's header filters when the request came and sent
    /// once the LISTENs are confirmed.
    head: Vec<u8>,
}

/* the content handler */

/// The request of a subscriber: a WebSocket handshake, or a `streaming` or `eventsource`
/// GET (`eventsource`).
pub fn subscribe(r: &mut ngx_http_request_t, stream: Option<bool>) -> Result<ngx_int_t, ngx_int_t> {
    if r.method != NGX_HTTP_GET as usize {
        return Ok(http::send_not_allowed(r, "GET"));
    }
    // SAFETY: the request is in its content phase
    let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
    if rc != OK {
        return Ok(rc);
    }
    if let Some(eventsource) = stream {
        return subscribe_stream(r, eventsource);
    }

    let hs = HandshakeRequest {
        upgrade: http::header_in(r, "Upgrade"),
        connection: http::header_in(r, "Connection"),
        key: http::header_in(r, "Sec-WebSocket-Key"),
        version: http::header_in(r, "Sec-WebSocket-Version"),
    };
    let accept = match ws::accept(&hs) {
        Ok(a) => a,
        Err(e) => {
            // a client that asked for an upgrade will not reuse this connection
            r.set_keepalive(0);
            if e == HandshakeError::Version
                && http::header_out(r, "Sec-WebSocket-Version", ws::SUPPORTED_VERSIONS).is_err()
            {
                return Err(ERROR);
            }
            return Ok(http::send_explain(r, 400, &e.to_string()));
        }
    };

    let (channels, refusal) = match path_channels(r) {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some((e.status(), e.to_string()))),
    };
    let hs = Handshake { accept, refusal, head: Vec::new() };
    start(r, channels, Some(Box::new(hs)), Framing::WebSocket)
}

/// The PostgreSQL channels of the request's channels path.
pub(super) fn path_channels(
    r: &mut ngx_http_request_t,
) -> Result<Vec<(String, u32)>, channels::ChannelError> {
    let (path, limits) = http::channels_path(r);
    let list = channels::parse_path(&path, limits)?;
    let ids: Vec<&[u8]> = list.iter().map(|c| c.id.as_bytes()).collect();
    let refused = |why| match why {
        Refusal::TooManySubscribers => ChannelError::TooManySubscribers,
        Refusal::NotCreated => ChannelError::NotCreated,
        Refusal::TooManyChannels | Refusal::Full => ChannelError::TooManyChannels,
    };
    // push-stream's order: per channel, in path order, an unauthorized or full channel,
    // then the events channel; then the wildcard quota; then the number of channels
    let events_at = (http::loc_conf(r).allow_connections_to_events_channel != 1)
        .then(|| ids.iter().position(|id| events::is_events_channel(id)))
        .flatten();
    let counted = zone::check_join(&ids, &http::counter_limits(r, true)).err();
    match (counted, events_at) {
        (Some((k, why @ (Refusal::NotCreated | Refusal::TooManySubscribers))), e)
            if e.map_or(true, |e| k <= e) =>
        {
            return Err(refused(why))
        }
        (_, Some(_)) => return Err(ChannelError::EventsChannel),
        _ => {}
    }
    check_wildcards(r, &ids)?;
    if let Some((_, why)) = counted {
        return Err(refused(why));
    }
    Ok(list.iter().map(|c| (channels::pg_channel(limits.pg_prefix, &c.id), c.backtrack)).collect())
}

/// `push_stream_wildcard_channel_max_qtd`: at most that many wildcard channels, and never
/// wildcard channels alone.
fn check_wildcards(r: &ngx_http_request_t, ids: &[&[u8]]) -> Result<(), ChannelError> {
    let (lcf, mcf) = (http::loc_conf(r), http::main_conf(r));
    let max = MainConf::limit(lcf.wildcard_channel_max_qtd)
        .or(MainConf::limit(mcf.max_number_of_wildcard_channels));
    let Some(max) = max else { return Ok(()) };
    let wild = ids.iter().filter(|id| zone::is_wildcard(id)).count();
    if wild > 0 && (wild > max || wild == ids.len()) {
        return Err(ChannelError::TooManyWildcards);
    }
    Ok(())
}

/// The head of a stream, through nginx's header filters as push-stream's is (`add_header`,
/// `expires`, `charset`, `gzip`, the server and date lines): `200`, the content type,
/// chunked as `chunked`, never cached, with the CORS headers the handler added. Returns
/// the bytes nginx holds back for the body's first write, which the caller sends, and
/// whether the gzip filter claimed the body: the messages that follow bypass nginx's body
/// filters, so the subscriber then compresses them itself.
fn stream_head(
    r: &mut ngx_http_request_t,
    eventsource: bool,
    chunked: bool,
) -> Result<(Vec<u8>, bool), ()> {
    r.headers_out.status = nginx_sys::NGX_HTTP_OK as _;
    r.headers_out.content_length_n = -1;
    if eventsource {
        const TYPE: &str = "text/event-stream; charset=utf-8";
        r.headers_out.content_type =
            nginx_sys::ngx_str_t { len: TYPE.len(), data: TYPE.as_ptr().cast_mut() };
        r.headers_out.content_type_len = "text/event-stream".len();
        r.headers_out.content_type_lowcase = ptr::null_mut();
    } else {
        // the location's type, as nginx picks it (types, default_type)
        // SAFETY: the request is alive
        if unsafe { nginx_sys::ngx_http_set_content_type(r) } != nginx_sys::NGX_OK as ngx_int_t {
            return Err(());
        }
    }
    http::no_cache(r)?;
    // SAFETY: a request whose header is not sent yet
    let rc = unsafe { nginx_sys::ngx_http_send_header(r) };
    if rc == nginx_sys::NGX_ERROR as ngx_int_t || rc > nginx_sys::NGX_OK as ngx_int_t {
        return Err(());
    }
    if (r.chunked() != 0) != chunked {
        // a header filter changed the framing the messages were encoded for
        return Err(());
    }
    // SAFETY: a header set by a filter lives in the request's pool
    let gzip = match unsafe { r.headers_out.content_encoding.as_ref() } {
        None => false,
        Some(h) if h.hash != 0 && h.value.as_bytes().eq_ignore_ascii_case(b"gzip") => true,
        Some(h) if h.hash == 0 => false,
        Some(h) => {
            let name = String::from_utf8_lossy(h.value.as_bytes()).into_owned();
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                // SAFETY: the request's connection is live
                unsafe { (*r.connection).log },
                "pgpush: a stream cannot be encoded as \"{}\" (only gzip is)",
                name
            );
            return Err(());
        }
    };
    let mut head = Vec::new();
    // SAFETY: the request's pending output chain (the head nginx postponed, or what it
    // could not write yet), memory buffers of its pool
    unsafe {
        let mut cl = r.out;
        while !cl.is_null() {
            let b = &*(*cl).buf;
            if b.in_file() == 0 && !b.pos.is_null() {
                let n = b.last.offset_from(b.pos);
                if n > 0 {
                    head.extend_from_slice(core::slice::from_raw_parts(b.pos, n as usize));
                }
            }
            cl = (*cl).next;
        }
        r.out = ptr::null_mut();
        let c = &mut *r.connection;
        c.set_buffered(c.buffered() & !nginx_sys::NGX_HTTP_WRITE_BUFFERED);
    }
    Ok((head, gzip))
}

/// `streaming` and `eventsource`: channel errors are plain HTTP answers.
fn subscribe_stream(r: &mut ngx_http_request_t, eventsource: bool) -> Result<ngx_int_t, ngx_int_t> {
    if r.http_version >= nginx_sys::NGX_HTTP_VERSION_20 as usize {
        return Ok(http::send_explain(r, 505, "Streaming subscribers need HTTP/1.x."));
    }
    let channels = match path_channels(r) {
        Ok(list) => list,
        Err(e) => return Ok(http::send_explain(r, e.status().into(), &e.to_string())),
    };
    // as nginx's chunked filter will decide for the head
    // SAFETY: the core module's location conf always exists, as long as the configuration
    let chunked_on = unsafe {
        let req = ngx::http::Request::from_ngx_http_request(r);
        NgxHttpCoreModule::location_conf(req).is_some_and(|c| c.chunked_transfer_encoding != 0)
    };
    let chunked = r.http_version >= nginx_sys::NGX_HTTP_VERSION_11 as usize && chunked_on;
    let padding = padding_rule(r);
    // the head is made now, so that it is known whether gzip claims the body before any
    // message is encoded; it is sent once the LISTENs are confirmed
    r.set_keepalive(0);
    let Ok((head, gzip)) = stream_head(r, eventsource, chunked) else {
        return Err(ERROR);
    };
    let hs = Handshake { accept: String::new(), refusal: None, head };
    start(r, channels, Some(Box::new(hs)), Framing::Stream { eventsource, chunked, padding, gzip })
}

/// The first `push_stream_padding_by_user_agent` rule that matches the client's user
/// agent (`push_stream_user_agent`, else the `User-Agent` header), from 1; 0 for none.
fn padding_rule(r: &mut ngx_http_request_t) -> u8 {
    let lcf = http::loc_conf(r);
    if lcf.padding_regex.is_empty() {
        return 0;
    }
    let agent = if lcf.user_agent.is_null() {
        http::header_in(r, "User-Agent").map(<[u8]>::to_vec)
    } else {
        // push-stream unescapes its complex values (`$arg_ua=test%201`)
        http::complex_value(r, lcf.user_agent).map(|v| channels::unescape(&v))
    };
    let Some(mut agent) = agent.filter(|a| !a.is_empty()) else { return 0 };
    let mut s = nginx_sys::ngx_str_t { len: agent.len(), data: agent.as_mut_ptr() };
    lcf.padding_regex
        .iter()
        // SAFETY: compiled at configuration time; s points at the agent's bytes
        .position(|&re| unsafe { nginx_sys::ngx_regex_exec(re, &mut s, ptr::null_mut(), 0) } >= 0)
        .map_or(0, |k| (k + 1).min(usize::from(u8::MAX)) as u8)
}

/// Admits the subscriber, joins its channels and holds the request until it is ready.
fn start(
    r: &mut ngx_http_request_t,
    channels: Vec<(String, u32)>,
    handshake: Option<Box<Handshake>>,
    framing: Framing,
) -> Result<ngx_int_t, ngx_int_t> {
    let lcf = http::loc_conf(r);
    // SAFETY: the core module's location conf always exists, as long as the configuration
    let clcf: &'static ngx_http_core_loc_conf_t = unsafe {
        let req = ngx::http::Request::from_ngx_http_request(r);
        NgxHttpCoreModule::location_conf(req).ok_or(err500())?
    };
    let sub = Box::new(Subscriber {
        r: ptr::from_mut(r),
        cln: ptr::null_mut(),
        c: r.connection,
        lcf,
        sub: Subscription::admit(r, lcf, channels),
        handshake,
        state: State::Handshake,
        out: Output::default(),
        reader: None,
        ping_timer: false,
        gz: None,
        clcf,
        framing,
    });

    // SAFETY: the cleanup is allocated from the request pool and runs when it is freed
    let cln = unsafe { nginx_sys::ngx_http_cleanup_add(r, 0) };
    if cln.is_null() {
        return Err(err500());
    }
    let raw = Box::into_raw(sub);
    // SAFETY: cln is fresh; raw is ours until the cleanup takes it back
    unsafe {
        (*cln).handler = Some(cleanup);
        (*cln).data = raw.cast();
    }
    // SAFETY: raw is live until the cleanup, which leaves first
    let sub = unsafe { &mut *raw };
    // SAFETY: as above
    let key = unsafe { SubKey::new(sub) };
    sub.cln = cln;
    // SAFETY: the module's slot in the request's context array
    unsafe { *r.ctx.add(HttpPgPushModule::module().ctx_index) = raw.cast() };

    let waiting = lifecycle::join(key);

    // held until the connection ends; this handler's NGX_DONE returns one count
    // SAFETY: r->main is the request itself
    unsafe { (*r.main).set_count((*r.main).count() + 1) };
    r.read_event_handler = Some(nginx_sys::ngx_http_test_reading);
    if waiting == 0 {
        // answered from the event loop, by a handler of our own (not the request's: the
        // request is freed on the way, which nginx's request handler does not expect); the
        // request must outlive this handler's return
        // SAFETY: the connection's write event, unused until the 101; closing the
        // connection unposts it
        unsafe {
            let wev = (*r.connection).write;
            (*wev).handler = Some(handshake_posted);
            if (*wev).posted() == 0 {
                nginx_sys::ngx_post_event(wev, ptr::addr_of_mut!(ngx_posted_events));
            }
        }
    }
    Ok(DONE)
}

fn err500() -> ngx_int_t {
    NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t
}

extern "C" fn cleanup(data: *mut c_void) {
    // SAFETY: data is the Box leaked in subscribe(); cleanups run once
    let mut sub = unsafe { Box::from_raw(data.cast::<Subscriber>()) };
    // SAFETY: the key of this transport, leaving before it is freed
    lifecycle::leave(unsafe { SubKey::new(&mut *sub) });
}

/// The connection's write handler until the 101 when no LISTEN is awaited: answers.
extern "C" fn handshake_posted(wev: *mut ngx_event_t) {
    // SAFETY: before the 101 the connection's data is the request, whose module context
    // slot holds the subscriber until the request is freed
    let sub = unsafe {
        let r = (*(*wev).data.cast::<ngx_connection_t>()).data.cast::<ngx_http_request_t>();
        *(*r).ctx.add(HttpPgPushModule::module().ctx_index)
    };
    let Some(sub) = (unsafe { sub.cast::<Subscriber>().as_mut() }) else {
        return;
    };
    if sub.state == State::Handshake && sub.sub.waiting() == 0 {
        sub.ready();
    }
}

/* events */

/// Read events of a subscriber's connection after the handshake.
extern "C" fn on_read(rev: *mut ngx_event_t) {
    // SAFETY: the connection's data is its subscriber from detach() until it closes
    let sub = unsafe { &mut *(*(*rev).data.cast::<ngx_connection_t>()).data.cast::<Subscriber>() };
    // SAFETY: rev is live
    let rev = unsafe { &mut *rev };
    if rev.timedout() != 0 {
        rev.set_timedout(0);
        match sub.state {
            // push_stream_subscriber_connection_ttl
            State::Open => sub.start_close(None, ""),
            _ => sub.state = State::Dead,
        }
    } else {
        match sub.state {
            // a stream's client sends nothing more: only its end matters
            State::Open if sub.framing != Framing::WebSocket => sub.stream_input(),
            State::Open => sub.read_frames(),
            State::Closing { shut, .. } => {
                if sub.discard_input() && sub.state != State::Dead {
                    sub.state = State::Closing { answered: true, shut };
                }
            }
            _ => {
                sub.discard_input();
            }
        }
    }
    sub.write_queued();
    sub.finish_if_done();
}

extern "C" fn on_write(wev: *mut ngx_event_t) {
    // SAFETY: as in on_read
    let sub = unsafe { &mut *(*(*wev).data.cast::<ngx_connection_t>()).data.cast::<Subscriber>() };
    // SAFETY: wev is live
    let wev = unsafe { &mut *wev };
    if wev.timedout() != 0 {
        wev.set_timedout(0);
        if sub.ping_timer && sub.state == State::Open {
            sub.ping_timer = false;
            let ping = sub.ping();
            sub.put(ping);
        } else {
            // SAFETY: c is live
            unsafe { (*sub.c).set_timedout(1) };
            ngx::ngx_log_error!(NGX_LOG_INFO, sub.log(), "pgpush: client timed out while sending");
            sub.state = State::Dead;
        }
    }
    {
        sub.write_queued();
    }
    sub.finish_if_done();
}

thread_local! {
    static PING: Rc<[u8]> = Rc::from(&[0x89u8, 0x00][..]);
}

/// Subscribers of one location share encoded frames; the identity template is shared by
/// all.
const KIND: u16 = 1;

impl Transport for Subscriber {
    fn subscription(&mut self) -> &mut Subscription {
        &mut self.sub
    }

    fn ready(&mut self) {
        if self.state != State::Handshake {
            return;
        }
        if self.open().is_err() {
            self.state = State::Dead;
        }
        self.finish_if_done();
    }

    fn accepts(&self) -> bool {
        matches!(self.state, State::Handshake | State::Open)
    }

    fn encoding(&self) -> Encoding {
        let identity = self.lcf.template.as_ref().map_or(true, |t| t.is_identity());
        let template = if identity { ptr::null() } else { ptr::from_ref(self.lcf).cast() };
        let kind = match self.framing {
            Framing::WebSocket => KIND,
            Framing::Stream { eventsource, chunked, padding, gzip } => {
                KIND + 1
                    + 2 * u16::from(eventsource)
                    + u16::from(!chunked)
                    + 4 * u16::from(padding)
                    + 8 * u16::from(gzip)
            }
        };
        Encoding { kind, template }
    }

    fn encode(&self, message: &Values<'_>) -> Rc<[u8]> {
        let mut text = Vec::new();
        let eventsource = matches!(self.framing, Framing::Stream { eventsource: true, .. });
        let (op, body) = if message.binary {
            // byte-exact: a template is text and does not apply
            (ws::OP_BINARY, message.text)
        } else if eventsource {
            text = stream::eventsource_message(self.lcf.template.as_ref(), message);
            (ws::OP_TEXT, &text[..])
        } else {
            match self.lcf.template.as_ref() {
                Some(t) if !t.is_identity() => {
                    t.render(message, &mut text);
                    (ws::OP_TEXT, &text[..])
                }
                _ => (ws::OP_TEXT, message.text),
            }
        };
        let mut buf = Vec::with_capacity(body.len() + 10);
        match self.padding() {
            Some((rule, max)) if !message.binary => {
                // push-stream measures the formatted message, without its id and event lines
                let prefix = if eventsource {
                    let id = message.event_id.len();
                    let ty = message.event_type.len();
                    usize::from(id > 0) * (id + 5) + usize::from(ty > 0) * (ty + 8)
                } else {
                    0
                };
                let mut padded = body.to_vec();
                let n = values::padding_len(rule.message_size, body.len() - prefix, max);
                values::padding_bytes(n, eventsource, &mut padded);
                self.framing.frame(op, &padded, &mut buf);
            }
            _ => self.framing.frame(op, body, &mut buf),
        }
        Rc::from(buf)
    }

    /// The limit bounds a subscriber's backlog: a message is refused (and the subscriber
    /// closed) when what was already unsent exceeds it, so one message larger than the
    /// limit still reaches a subscriber that keeps up. A history is queued whole, and
    /// what is left of it unsent does not count.
    fn queue(&mut self, frame: Rc<[u8]>, channel: &str) {
        let before = self.out.bytes;
        self.put(frame);
        if lifecycle::from_history() {
            self.out.history += self.out.bytes.saturating_sub(before);
            return;
        }
        let behind = before.saturating_sub(self.out.history);
        if behind > self.lcf.subscriber_output_limit {
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                self.log(),
                "pgpush: subscriber too slow, closing it{}: {} bytes unsent exceed \
                 push_stream_subscriber_output_limit {}, channel \"{}\"",
                if self.framing == Framing::WebSocket { " with 1013" } else { "" },
                behind,
                self.lcf.subscriber_output_limit,
                channel
            );
            self.out.drop_unsent();
            self.start_close(Some(close::TRY_AGAIN_LATER), "Subscriber too slow");
        }
    }

    fn flush(&mut self) {
        self.write_queued();
        self.finish_if_done();
    }

    fn reply(&mut self, rows: Vec<Reply>) {
        if self.state != State::Open {
            return;
        }
        for row in rows {
            let mut buf = Vec::new();
            match &row {
                Reply::Text(t) => ws::encode(ws::OP_TEXT, t.as_bytes(), &mut buf),
                Reply::Binary(b) => ws::encode(ws::OP_BINARY, b, &mut buf),
            }
            self.out.push(Rc::from(buf));
        }
        self.write_queued();
        self.finish_if_done();
    }

    fn finish(&mut self) {
        if self.state == State::Open {
            self.start_close(None, "");
            self.write_queued();
        }
        self.finish_if_done();
    }

    fn going_away(&mut self) {
        if self.state == State::Handshake && !self.r.is_null() && self.open().is_err() {
            // still waiting for its LISTENs: answered all the same (push-stream answers at
            // once), then ended as the others
            self.state = State::Dead;
        }
        if self.state == State::Open {
            self.start_close(Some(close::GOING_AWAY), "");
            self.write_queued();
        }
        self.state = State::Dead;
        self.finish_if_done();
    }
}

impl Subscriber {
    /// The padding rule of this stream subscriber and the location's largest padding.
    fn padding(&self) -> Option<(&'static values::Padding, usize)> {
        let Framing::Stream { padding, .. } = self.framing else { return None };
        let rules = self.lcf.padding_by_user_agent.as_deref()?;
        let rule = rules.get(usize::from(padding).checked_sub(1)?)?;
        let max = rules.iter().map(|p| p.header_size.max(p.message_size)).max().unwrap_or(0);
        Some((rule, max))
    }

    fn log(&self) -> *mut nginx_sys::ngx_log_t {
        // SAFETY: c is live while the subscriber is
        unsafe { (*self.c).log }
    }

    /// Answers 101 and starts the WebSocket session.
    fn open(&mut self) -> Result<(), ()> {
        // SAFETY: the request is alive and its header not sent yet
        let r = unsafe { &mut *self.r };
        r.set_keepalive(0);
        // messages that reached a subscriber admitted at once, before its answer was due
        // (its channels were listened already): they follow the head and header template
        let early = std::mem::take(&mut self.out);
        let mut refusal = None;
        match self.framing {
            Framing::WebSocket => {
                // push-stream's head, written as it is (no other header applies to an
                // upgrade); the request still logs its status
                r.set_header_sent(1);
                r.headers_out.status = nginx_sys::NGX_HTTP_SWITCHING_PROTOCOLS as _;
                let hs = self.handshake.take().ok_or(())?;
                let explain = hs.refusal.as_ref().map(|(_, e)| e.as_str());
                self.out.push(Rc::from(ws::response_head(&hs.accept, explain)));
                refusal = hs.refusal;
            }
            Framing::Stream { gzip, .. } => {
                let head = self.handshake.take().map(|hs| hs.head).unwrap_or_default();
                if !head.is_empty() {
                    self.out.push(Rc::from(head));
                }
                if gzip {
                    // nginx's gzip_comp_level is the gzip filter's own; 1 is its default
                    let gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    self.gz = Some(Box::new(gz));
                }
            }
        }
        self.state = State::Open;
        if self.write_out().is_err() {
            return Err(());
        }
        self.detach();

        if let Some((status, explain)) = refusal {
            self.start_close(Some(close::POLICY), &ws::channel_error_reason(status, &explain));
            self.write_queued();
            return Ok(());
        }
        let header = self.lcf.header_template.as_bytes();
        let mut head = match self.framing {
            Framing::Stream { eventsource: true, .. } if header.is_empty() => {
                stream::EVENTSOURCE_HEADER.to_vec()
            }
            Framing::Stream { eventsource: true, .. } => stream::eventsource_comments(header),
            _ => header.to_vec(),
        };
        if !head.is_empty() {
            if let Some((rule, max)) = self.padding() {
                let n = values::padding_len(rule.header_size, head.len(), max);
                let eventsource = matches!(self.framing, Framing::Stream { eventsource: true, .. });
                values::padding_bytes(n, eventsource, &mut head);
            }
            self.push_text(&head);
        }
        for frame in early.chunks {
            self.put(frame);
        }
        self.arm_ping();
        if self.lcf.subscriber_connection_ttl != nginx_sys::NGX_CONF_UNSET as ngx_msec_t {
            // SAFETY: the connection's read timer is ours after the handshake
            unsafe { nginx_sys::ngx_add_timer((*self.c).read, self.lcf.subscriber_connection_ttl) };
        }
        self.write_queued();
        // frames the client sent right behind its handshake
        // SAFETY: c is live
        if unsafe { (*(*self.c).read).ready() } != 0 {
            self.read_frames();
            self.write_queued();
        }
        Ok(())
    }

    /// Logs and frees the request; the connection is driven by on_read/on_write from now.
    fn detach(&mut self) {
        let data = ptr::from_mut(self).cast();
        // SAFETY: r is alive and done with; our cleanup is disarmed first so that freeing
        // the request leaves the subscriber alone
        unsafe {
            (*self.cln).handler = None;
            let action = match self.framing {
                Framing::WebSocket => c"relaying WebSocket messages",
                Framing::Stream { eventsource: true, .. } => c"relaying EventSource messages",
                Framing::Stream { .. } => c"relaying streamed messages",
            };
            super::parked::keep_connection(self.r, data, on_read, on_write, action);
        }
        self.r = ptr::null_mut();
        self.cln = ptr::null_mut();
    }

    /// With nothing to send, the write timer counts down to the next ping (if pings are
    /// on); otherwise it is off.
    fn arm_ping(&mut self) {
        let every = self.lcf.ping_message_interval;
        let on = every != nginx_sys::NGX_CONF_UNSET as ngx_msec_t && every > 0;
        // SAFETY: the connection's write event is ours after the handshake
        unsafe {
            let wev = (*self.c).write;
            if on && self.state == State::Open {
                if !self.ping_timer || (*wev).timer_set() == 0 {
                    nginx_sys::ngx_add_timer(wev, every);
                    self.ping_timer = true;
                }
            } else if (*wev).timer_set() != 0 {
                nginx_sys::ngx_del_timer(wev);
                self.ping_timer = false;
            }
        }
    }

    /// Queues a text (header, footer) framed for the connection.
    fn push_text(&mut self, text: &[u8]) {
        let mut buf = Vec::with_capacity(text.len() + 10);
        self.framing.frame(ws::OP_TEXT, text, &mut buf);
        if !buf.is_empty() {
            self.put(Rc::from(buf));
        }
    }

    /// Queues framed output; a gzipped stream compresses it first, flushed so that the
    /// client can read it at once (as nginx's gzip filter flushes push-stream's messages).
    fn put(&mut self, frame: Rc<[u8]>) {
        let Some(gz) = self.gz.as_mut() else {
            return self.out.push(frame);
        };
        if gz.write_all(&frame).and_then(|()| gz.flush()).is_err() {
            self.state = State::Dead;
            return;
        }
        let data = std::mem::take(gz.get_mut());
        self.push_compressed(&data);
    }

    /// Queues compressed bytes, chunked if the stream is.
    fn push_compressed(&mut self, data: &[u8]) {
        let chunked = matches!(self.framing, Framing::Stream { chunked: true, .. });
        let mut buf = Vec::with_capacity(data.len() + 10);
        stream::chunk(data, chunked, &mut buf);
        if !buf.is_empty() {
            self.out.push(Rc::from(buf));
        }
    }

    /// What a ping is on this connection.
    fn ping(&self) -> Rc<[u8]> {
        match self.framing {
            Framing::WebSocket => PING.with(Rc::clone),
            Framing::Stream { eventsource: true, .. } => {
                let mut buf = Vec::new();
                self.framing.frame(ws::OP_TEXT, stream::EVENTSOURCE_PING, &mut buf);
                Rc::from(buf)
            }
            Framing::Stream { .. } => {
                // push-stream's ping message: id -1, push_stream_ping_message_text
                let text = http::cycle_main_conf().map_or(&b" "[..], |m| {
                    let t = m.ping_message_text.as_bytes();
                    if t.is_empty() {
                        &b" "[..]
                    } else {
                        t
                    }
                });
                let v = Values { text, id: -1, ..Values::default() };
                self.encode(&v)
            }
        }
    }

    /// Starts the closing handshake: footer, close frame (without a code when `None`, as
    /// push-stream ends a connection at its ttl), then wait for the client.
    fn start_close(&mut self, code: Option<u16>, reason: &str) {
        if self.state != State::Open {
            return;
        }
        // it gets no more messages: it is gone from the channels and the counts now, not
        // when its client has read the end
        // SAFETY: the key of this live transport
        lifecycle::leave(unsafe { SubKey::new(self) });
        let footer = self.lcf.footer_template.as_bytes();
        if let Framing::Stream { eventsource, chunked, .. } = self.framing {
            if eventsource {
                self.push_text(&stream::eventsource_comments(footer));
            } else if !footer.is_empty() {
                self.push_text(footer);
            }
            if let Some(gz) = self.gz.take() {
                // the end of the deflate stream and gzip's trailer
                if let Ok(tail) = gz.finish() {
                    self.push_compressed(&tail);
                }
            }
            if chunked {
                self.out.push(Rc::from(stream::LAST_CHUNK));
            }
            // nothing to wait for: the connection closes once this is out
            self.state = State::ClosingPeer;
            return;
        }
        if !footer.is_empty() {
            self.push_text(footer);
        }
        let mut buf = Vec::new();
        match code {
            Some(code) => ws::encode_close(code, reason, &mut buf),
            None => buf.extend_from_slice(&ws::EMPTY_CLOSE),
        }
        self.out.push(Rc::from(buf));
        self.state = State::Closing { answered: false, shut: false };
        // SAFETY: the read timer now bounds the closing handshake
        unsafe { nginx_sys::ngx_add_timer((*self.c).read, CLOSE_TIMEOUT) };
    }

    /// Reads client frames until the socket is drained, or until too many of this
    /// client's messages wait for PostgreSQL (the rest stays in the socket: TCP pushes back
    /// on the client, and reading resumes as publishes complete).
    fn read_frames(&mut self) {
        let max = self.clcf.client_max_body_size as usize;
        let max = (max > 0).then_some(max);
        let mut reader = self.reader.take().unwrap_or_else(|| {
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .write_buffer_size(0)
                .max_message_size(max)
                .max_frame_size(max);
            Box::new(Reader {
                ctx: WebSocketContext::new(Role::Server, Some(config)),
                pending: VecDeque::new(),
                paused: false,
            })
        });
        reader.paused = false;
        let next = loop {
            if reader.pending.len() >= MAX_PENDING {
                reader.paused = true;
                break Ok(State::Open);
            }
            let mut io = Io { c: self.c, out: &mut self.out };
            let message = match reader.ctx.read(&mut io) {
                Ok(Message::Close(_)) => {
                    // queues the echo of the client's code
                    let _ = reader.ctx.flush(&mut io);
                    break Ok(State::ClosingPeer);
                }
                Ok(Message::Text(t)) => Incoming::Text(t),
                Ok(Message::Binary(b)) => Incoming::Binary(b),
                Ok(_) => continue,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    break Ok(State::Open);
                }
                Err(
                    WsError::Io(_)
                    | WsError::ConnectionClosed
                    | WsError::AlreadyClosed
                    | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                ) => break Ok(State::Dead),
                Err(e) => {
                    let code = match e {
                        WsError::Utf8(_) => close::INVALID_DATA,
                        WsError::Capacity(_) => close::TOO_BIG,
                        _ => close::PROTOCOL,
                    };
                    break Err((code, e.to_string()));
                }
            };
            if let Err(e) = self.client_message(&mut reader, message) {
                break Err(e);
            }
        };
        match next {
            Ok(State::Open) => self.reader = Some(reader),
            Ok(state) => self.state = state,
            Err((code, reason)) => self.start_close(Some(code), &reason),
        }
    }

    /// A message from the client: published to every channel of the path with
    /// `push_stream_websocket_allow_publish on`, ignored otherwise (as push-stream does).
    fn client_message(
        &mut self,
        reader: &mut Reader,
        message: Incoming,
    ) -> Result<(), (u16, String)> {
        // the publish hooks run whether or not the message is published
        let hooked = match &message {
            Incoming::Text(t) => hooks::Message::Text(t.as_str()),
            Incoming::Binary(b) => hooks::Message::Binary(b),
        };
        // SAFETY: the key of this live transport
        lifecycle::client_message(unsafe { SubKey::new(self) }, &hooked);
        if self.lcf.websocket_allow_publish != 1 {
            return Ok(());
        }
        let payload = match &message {
            Incoming::Text(t) => payload::wrap_text(t.as_str()),
            Incoming::Binary(b) => payload::wrap_binary(b),
        };
        let prefix = worker::with(|w| w.prefix.len()).unwrap_or(0);
        // channels too long for an identifier carry their id in the payload
        let each: Vec<(String, String, String)> = self
            .sub
            .channels()
            // as push-stream: a client never publishes to the events channel
            .filter(|channel| !events::is_events_channel(&channel.as_bytes()[prefix..]))
            .map(|channel| {
                let id = channel.get(prefix..).unwrap_or_default();
                let notified = payload::for_channel(channel, id, &payload);
                (channel.to_string(), id.to_string(), notified)
            })
            .collect();
        let largest = each.iter().map(|(_, _, p)| p.len()).max().unwrap_or(0);
        let stored = self.lcf.store_messages == 1 && worker::with(|w| w.store).unwrap_or(false);
        if largest > MAX_PAYLOAD && !stored {
            ngx::ngx_log_error!(
                NGX_LOG_INFO,
                self.log(),
                "pgpush: client message of {} bytes ({} as a notification) is over the \
                 {MAX_PAYLOAD} bytes a PostgreSQL notification carries, closing with 1009",
                message.len(),
                largest
            );
            let reason =
                format!("Message too large: a notification carries at most {MAX_PAYLOAD} bytes");
            return Err((close::TOO_BIG, reason));
        }
        let me = ptr::from_mut(self);
        worker::with(|w| {
            for (channel, id, notified) in each {
                let done = Box::new(move |n, outcome: Result<i64, &str>| {
                    if let Ok(kept) = outcome {
                        if zone::published(id.as_bytes(), true) {
                            events::emit(Event::ChannelCreated, id.as_bytes());
                        }
                        if stored {
                            zone::stored(id.as_bytes(), kept);
                        }
                    }
                    published(me, n, outcome.map(|_| ()))
                });
                reader.pending.push_back(w.publish(channel, notified, stored, done));
            }
        });
        Ok(())
    }

    /// Reads and drops what a stream's client sends; its end ends the subscriber.
    fn stream_input(&mut self) {
        let mut buf = [0u8; 1024];
        loop {
            let mut io = Io { c: self.c, out: &mut self.out };
            match io.read(&mut buf) {
                Ok(0) => break self.state = State::Dead,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break self.state = State::Dead,
            }
        }
    }

    /// Reads and drops input while closing; true at the client's end (EOF or an error),
    /// or, over TLS, if anything arrived.
    fn discard_input(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut got = false;
        loop {
            let mut io = Io { c: self.c, out: &mut self.out };
            match io.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => got = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got && self.tls(),
                Err(_) => {
                    self.state = State::Dead;
                    return true;
                }
            }
        }
    }

    /// Writes queued output; arms the write event and `send_timeout` if some is left.
    fn write_queued(&mut self) {
        if matches!(self.state, State::Dead | State::Handshake) {
            return;
        }
        if self.write_out().is_err() {
            self.state = State::Dead;
            return;
        }
        // SAFETY: c and its write event are live
        unsafe {
            let wev = (*self.c).write;
            let pending = !self.out.is_empty() || self.lower_buffered();
            if pending {
                if nginx_sys::ngx_handle_write_event(wev, 0) != OK {
                    self.state = State::Dead;
                    return;
                }
                if (*wev).timer_set() == 0 || self.ping_timer {
                    nginx_sys::ngx_add_timer(wev, self.clcf.send_timeout);
                    self.ping_timer = false;
                }
                return;
            }
        }
        self.arm_ping();
    }

    /// A TLS connection is never half-closed: any answer of its client ends the closing.
    fn tls(&self) -> bool {
        // SAFETY: c is live
        unsafe { !(*self.c).ssl.is_null() }
    }

    /// Bytes the connection's own layer holds (TLS buffers what it could not write yet).
    fn lower_buffered(&self) -> bool {
        // SAFETY: c is live
        unsafe { (*self.c).buffered() & nginx_sys::NGX_LOWLEVEL_BUFFERED != 0 }
    }

    fn write_out(&mut self) -> Result<(), ()> {
        let c = self.c;
        // SAFETY: c is live; bufs and links live on this stack frame only
        unsafe {
            let send_chain = (*c).send_chain.ok_or(())?;
            while (!self.out.is_empty() || self.lower_buffered()) && (*(*c).write).ready() != 0 {
                let mut bufs: [ngx_buf_t; IOV] = core::mem::zeroed();
                let mut links: [ngx_chain_t; IOV] = core::mem::zeroed();
                let mut n = 0;
                for (i, chunk) in self.out.chunks.iter().take(IOV).enumerate() {
                    let data = if i == 0 { &chunk[self.out.head..] } else { &chunk[..] };
                    let b = &mut bufs[i];
                    b.start = data.as_ptr().cast_mut();
                    b.pos = b.start;
                    b.last = b.start.add(data.len());
                    b.end = b.last;
                    b.set_memory(1);
                    links[i].buf = b;
                    n = i + 1;
                }
                for i in 1..n {
                    links[i - 1].next = &mut links[i];
                }
                // TLS copies into its own buffer and writes only on a flush; a null chain
                // flushes what it holds
                let chain = if n == 0 { ptr::null_mut() } else { links.as_mut_ptr() };
                if n > 0 {
                    bufs[n - 1].set_flush(1);
                }
                let rest = send_chain(c, chain, 0);
                if rest as isize == nginx_sys::NGX_ERROR as isize {
                    (*c).set_error(1);
                    return Err(());
                }
                // what the layer below took: sent, or buffered by TLS
                let taken: usize =
                    bufs[..n].iter().map(|b| b.pos.offset_from(b.start) as usize).sum();
                self.out.consume(taken);
                if taken == 0 && !rest.is_null() || (*(*c).write).ready() == 0 {
                    break;
                }
                if n == 0 {
                    // a flush of the TLS buffer that did not block has nothing more to do
                    break;
                }
            }
        }
        Ok(())
    }

    /// Finalizes the request once the connection has nothing left to do. The subscriber
    /// is freed by the cleanup: nothing may touch `self` afterwards.
    fn finish_if_done(&mut self) {
        let idle = self.out.is_empty() && !self.lower_buffered();
        let done = match self.state {
            State::Dead => true,
            State::ClosingPeer => idle,
            State::Closing { answered: false, shut: false } if idle && !self.tls() => {
                // our close frame is out: half-close, and read until the client's end
                // SAFETY: c is live; its socket is open
                if unsafe { libc::shutdown((*self.c).fd, libc::SHUT_WR) } != 0 {
                    true
                } else {
                    self.state = State::Closing { answered: false, shut: true };
                    false
                }
            }
            State::Closing { answered, .. } => answered && idle,
            State::Handshake | State::Open => false,
        };
        if !done {
            return;
        }
        if !self.r.is_null() {
            // still a request (the handshake was not answered): nginx frees everything
            return finalize(self.r, NGX_HTTP_CLOSE as ngx_int_t);
        }
        let c = self.c;
        cleanup(ptr::from_mut(self).cast());
        // SAFETY: the connection is ours since detach(); the subscriber is gone
        unsafe { nginx_sys::ngx_http_close_connection(c) };
    }
}

/// A client's message.
enum Incoming {
    Text(tungstenite::Utf8Bytes),
    Binary(tungstenite::Bytes),
}

impl Incoming {
    fn len(&self) -> usize {
        match self {
            Incoming::Text(t) => t.len(),
            Incoming::Binary(b) => b.len(),
        }
    }
}

/// The read side of an open connection, made on the first client frame.
struct Reader {
    ctx: WebSocketContext,
    /// Client publishes waiting for PostgreSQL, oldest first.
    pending: VecDeque<u64>,
    /// Reading stopped at [`MAX_PENDING`].
    paused: bool,
}

impl Drop for Reader {
    fn drop(&mut self) {
        // the subscriber is going: answers for it must not arrive
        if !self.pending.is_empty() {
            worker::with(|w| self.pending.drain(..).for_each(|id| drop(w.take_publish(id))));
        }
    }
}

/// PostgreSQL answered one of this client's publishes.
fn published(sub: *mut Subscriber, id: u64, outcome: Result<(), &str>) {
    // SAFETY: a subscriber with pending publishes is alive: dropping its reader forgets them
    let sub = unsafe { &mut *sub };
    let Some(reader) = sub.reader.as_mut() else {
        return;
    };
    reader.pending.retain(|p| *p != id);
    let paused = reader.paused && reader.pending.len() <= MAX_PENDING / 2;
    match outcome {
        Err(why) => {
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                sub.log(),
                "pgpush: client message not published, closing with 1011: {}",
                why
            );
            sub.reader = None;
            sub.start_close(Some(close::INTERNAL), "database unavailable");
        }
        Ok(()) if paused && sub.state == State::Open => sub.read_frames(),
        Ok(()) => return,
    }
    sub.write_queued();
    sub.finish_if_done();
}

/// The nginx connection as tungstenite's stream: reads go to the socket, writes (pongs,
/// close echoes) join the subscriber's output queue in order.
struct Io<'a> {
    c: *mut ngx_connection_t,
    out: &'a mut Output,
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: c is live; recv writes at most buf.len() bytes
        let n = unsafe {
            let recv = (*self.c).recv.ok_or(io::ErrorKind::Unsupported)?;
            recv(self.c, buf.as_mut_ptr(), buf.len())
        };
        match n {
            n if n >= 0 => Ok(n as usize),
            n if n == nginx_sys::NGX_AGAIN as isize => Err(io::ErrorKind::WouldBlock.into()),
            _ => Err(io::ErrorKind::ConnectionReset.into()),
        }
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push(Rc::from(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A subscriber's unsent frames.
#[derive(Default)]
struct Output {
    chunks: VecDeque<Rc<[u8]>>,
    /// Bytes of the front chunk already sent.
    head: usize,
    bytes: usize,
    /// Of `bytes`, those of a history (counted as sent first).
    history: usize,
}

impl Output {
    fn push(&mut self, chunk: Rc<[u8]>) {
        self.bytes += chunk.len();
        self.chunks.push_back(chunk);
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        self.history = self.history.saturating_sub(n);
        while n > 0 {
            let left = self.chunks[0].len() - self.head;
            if n < left {
                self.head += n;
                return;
            }
            n -= left;
            self.chunks.pop_front();
            self.head = 0;
        }
        while self.chunks.front().is_some_and(|c| c.is_empty()) {
            self.chunks.pop_front();
        }
        if self.chunks.is_empty() && self.chunks.capacity() > 8 {
            // a burst is over: an idle subscriber keeps no queue memory
            self.chunks = VecDeque::new();
        }
    }

    /// Drops every frame not started yet (a started one must be finished).
    fn drop_unsent(&mut self) {
        let keep = usize::from(self.head > 0);
        self.chunks.truncate(keep);
        self.bytes = self.chunks.front().map_or(0, |c| c.len() - self.head);
        self.history = self.history.min(self.bytes);
    }
}
