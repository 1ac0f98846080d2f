//! `push_stream_subscriber long-polling`: the request waits for the next message on any of
//! its channels and is answered with it (`200`, the header template, the message, the
//! footer template), or, at `push_stream_longpolling_connection_ttl` (else
//! `push_stream_subscriber_connection_ttl`), with `304` (or `200` and push-stream's
//! timeout message, id -3 "Timed out", with `push_stream_timeout_with_body on`). `?callback=`
//! wraps the message in JSONP. The request is held as an ordinary nginx request: it lives
//! for one message at most.

use core::ffi::c_void;
use core::ptr;
use std::rc::Rc;

use nginx_sys::{ngx_http_request_t, ngx_int_t, ngx_msec_t};

use crate::nginx::conf::LocConf;
use crate::nginx::http::{self, finalize, DONE};
use crate::nginx::lifecycle::{self, Encoding, SubKey, Subscription, Transport};
use crate::nginx::worker;
use crate::postgres::cells::Reply;
use crate::postgres::store::{Since, Stored};
use crate::protocol::template::Values;

/// Long-pollers of one location share an encoded message.
const KIND: u16 = 0x8000;

pub struct LongPoller {
    r: *mut ngx_http_request_t,
    lcf: &'static LocConf,
    sub: Subscription,
    /// The messages that answer this request, with the time and tag of the last one.
    answer: Vec<Rc<[u8]>>,
    stamp: (i64, u64),
    done: bool,
    /// Whether it joined its channels (a polling request only reads their history).
    joined: bool,
    /// The history read in flight, for a polling request.
    reading: Option<u64>,
    /// Its history starts with the gap message: `X-Pgpush-Gap: 1` too.
    gap: bool,
}

/// A long-polling request: joins its channels and waits.
pub fn subscribe(
    r: &mut ngx_http_request_t,
    channels: Vec<(String, u32)>,
) -> Result<ngx_int_t, ngx_int_t> {
    let lcf = http::loc_conf(r);
    let poller = Box::new(LongPoller {
        r: ptr::from_mut(r),
        lcf,
        sub: Subscription::admit(r, lcf, channels),
        answer: Vec::new(),
        stamp: (0, 0),
        done: false,
        joined: true,
        reading: None,
        gap: false,
    });
    let raw = hold(r, poller)?;
    // SAFETY: raw is live until the cleanup, which leaves first
    let key = unsafe { SubKey::new(&mut *raw) };
    lifecycle::join(key);
    let ttl = match lcf.longpolling_connection_ttl {
        t if t != nginx_sys::NGX_CONF_UNSET as ngx_msec_t => t,
        _ => lcf.subscriber_connection_ttl,
    };
    if ttl != nginx_sys::NGX_CONF_UNSET as ngx_msec_t {
        // SAFETY: the connection's write event is unused while the request waits
        unsafe { nginx_sys::ngx_add_timer((*r.connection).write, ttl) };
    }
    Ok(DONE)
}

/// Keeps the poller with its request until the request is freed, and holds the request
/// until it is answered (the handler's NGX_DONE returns one count).
fn hold(r: &mut ngx_http_request_t, poller: Box<LongPoller>) -> Result<*mut LongPoller, ngx_int_t> {
    // SAFETY: the cleanup is allocated from the request pool and runs when it is freed
    let cln = unsafe { nginx_sys::ngx_http_cleanup_add(r, 0) };
    if cln.is_null() {
        return Err(nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
    }
    let raw = Box::into_raw(poller);
    // SAFETY: cln is fresh; raw is ours until the cleanup takes it back
    unsafe {
        (*cln).handler = Some(cleanup);
        (*cln).data = raw.cast();
        *r.ctx.add(<crate::nginx::HttpPgPushModule as ngx::http::HttpModule>::module().ctx_index) =
            raw.cast();
    }
    // SAFETY: r->main is the request itself
    unsafe { (*r.main).set_count((*r.main).count() + 1) };
    r.read_event_handler = Some(nginx_sys::ngx_http_test_reading);
    r.write_event_handler = Some(on_write);
    Ok(raw)
}

/// `polling`: answered at once. With a store and a position (`.bN`, a last event id, or
/// a time and tag), with the stored messages after it; else, or with none, `304`.
pub fn poll(
    r: &mut ngx_http_request_t,
    channels: Vec<(String, u32)>,
) -> Result<ngx_int_t, ngx_int_t> {
    let prefix = http::main_conf(r).channel_prefix().len();
    let ids: Vec<&str> = channels.iter().map(|(c, _)| c.get(prefix..).unwrap_or(c)).collect();
    super::polling::touch(r, &ids)?;
    let backtracks: Vec<u32> = channels.iter().map(|(_, b)| *b).collect();
    let since = lifecycle::resume_points(r, &backtracks);
    let asked: Vec<(String, Since)> =
        channels.iter().zip(since).filter_map(|((c, _), s)| s.map(|s| (c.clone(), s))).collect();
    if asked.is_empty() {
        return Ok(super::polling::not_modified(r));
    }
    let lcf = http::loc_conf(r);
    let poller = Box::new(LongPoller {
        r: ptr::from_mut(r),
        lcf,
        sub: Subscription::default(),
        answer: Vec::new(),
        stamp: (0, 0),
        done: false,
        joined: false,
        reading: None,
        gap: false,
    });
    let raw = hold(r, poller)?;
    let asked_ids: Vec<String> =
        asked.iter().map(|(c, _)| c.get(prefix..).unwrap_or(c).to_string()).collect();
    let done: worker::HistoryDone = Box::new(move |result| {
        // SAFETY: the cleanup drops this read before it frees the poller
        let poller = unsafe { &mut *raw };
        poller.reading = None;
        poller.polled(result, &asked_ids);
    });
    let id = match lifecycle::cached(&asked) {
        Some(lists) => worker::with(|w| w.answered(lists, done)),
        None => worker::with(|w| w.history(asked, done)),
    };
    // SAFETY: raw is live until the request's cleanup
    unsafe { (*raw).reading = id };
    Ok(DONE)
}

extern "C" fn cleanup(data: *mut c_void) {
    // SAFETY: data is the Box leaked in subscribe(); cleanups run once
    let mut poller = unsafe { Box::from_raw(data.cast::<LongPoller>()) };
    if let Some(id) = poller.reading.take() {
        worker::with(|w| drop(w.take_history(id)));
    }
    if !poller.joined {
        return;
    }
    // SAFETY: the key of this transport, leaving before it is freed
    lifecycle::leave(unsafe { SubKey::new(&mut *poller) });
}

/// The request's write handler while it waits: only the ttl timer wakes it.
extern "C" fn on_write(r: *mut ngx_http_request_t) {
    // SAFETY: the request is alive; its module context slot holds the poller
    let (wev, poller) = unsafe {
        let slot = *(*r)
            .ctx
            .add(<crate::nginx::HttpPgPushModule as ngx::http::HttpModule>::module().ctx_index);
        ((*(*r).connection).write, slot.cast::<LongPoller>().as_mut())
    };
    let Some(poller) = poller else { return };
    // SAFETY: the connection's write event
    if unsafe { (*wev).timedout() } == 0 {
        return;
    }
    unsafe { (*wev).set_timedout(0) };
    poller.timed_out();
}

impl LongPoller {
    fn timed_out(&mut self) {
        if self.done {
            return;
        }
        let with_body = http::cycle_main_conf().is_some_and(|m| m.timeout_with_body == 1);
        if with_body {
            let v = Values {
                text: b"Timed out",
                id: -3,
                time: "Thu, 01 Jan 1970 00:00:00 GMT",
                ..Values::default()
            };
            let body = Rc::from(self.render(&v));
            self.respond(200, &[body], None);
        } else {
            self.respond(304, &[], None);
        }
    }

    /// A polling request's history arrived: it answers with it, or `304`.
    fn polled(&mut self, result: Result<Vec<Vec<Stored>>, String>, ids: &[String]) {
        let lists = match result {
            Ok(lists) => lists,
            Err(why) => {
                ngx::ngx_log_error!(
                    nginx_sys::NGX_LOG_ERR,
                    // SAFETY: a waiting request is alive
                    unsafe { (*(*self.r).connection).log },
                    "pgpush: no history for a polling request: {}",
                    why
                );
                Vec::new()
            }
        };
        for (id, list) in ids.iter().zip(lists) {
            for m in list {
                let time = lifecycle::stored_time(&m);
                self.gap |= m.offset == crate::postgres::store::GAP_OFFSET;
                let v = lifecycle::stored_values(&m, id, &time);
                self.answer.push(Rc::from(self.render(&v)));
                if m.offset > 0 {
                    self.stamp = (m.second, m.tag.max(0) as u64);
                }
            }
        }
        if self.answer.is_empty() {
            self.done = true;
            // SAFETY: a waiting request is alive
            let r = unsafe { &mut *self.r };
            let rc = super::polling::not_modified(r);
            return finalize(r, rc);
        }
        let messages = std::mem::take(&mut self.answer);
        let stamp = self.stamp;
        self.respond(200, &messages, Some(stamp));
    }

    fn render(&self, v: &Values<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        match self.lcf.template.as_ref() {
            Some(t) if !t.is_identity() => t.render(v, &mut out),
            _ => out.extend_from_slice(v.text),
        }
        out
    }

    /// Answers and finalizes: the header and footer templates around a message, JSONP
    /// with `?callback=`; `304` has no body. A message's time and tag are its
    /// `Last-Modified` and `Etag`, else now and `W/0`.
    fn respond(&mut self, status: u32, messages: &[Rc<[u8]>], stamp: Option<(i64, u64)>) {
        self.done = true;
        // SAFETY: a waiting request is alive (its cleanup ends the poller)
        let r = unsafe { &mut *self.r };
        let mut body = Vec::new();
        if status != 304 {
            let callback = arg(r, b"callback");
            body.extend_from_slice(self.lcf.header_template.as_bytes());
            match &callback {
                Some(cb) => {
                    body.extend_from_slice(cb);
                    body.extend_from_slice(b"([");
                    for (k, m) in messages.iter().enumerate() {
                        if k > 0 {
                            body.push(b',');
                        }
                        body.extend_from_slice(m);
                    }
                    body.extend_from_slice(b"]);");
                }
                None => messages.iter().for_each(|m| body.extend_from_slice(m)),
            }
            body.extend_from_slice(self.lcf.footer_template.as_bytes());
            if callback.is_some() {
                const JS: &str = "application/javascript";
                r.headers_out.content_type =
                    nginx_sys::ngx_str_t { len: JS.len(), data: JS.as_ptr().cast_mut() };
                r.headers_out.content_type_len = JS.len();
            }
        }
        if r.headers_out.content_type.len == 0 {
            // SAFETY: the request is alive
            unsafe { nginx_sys::ngx_http_set_content_type(r) };
        }
        let (sec, tag) = stamp.unwrap_or((nginx_sys::ngx_time() as i64, 0));
        r.headers_out.last_modified_time = sec as _;
        let etag = format!("W/{tag}");
        if self.gap && http::header_out(r, "X-Pgpush-Gap", "1").is_err() {
            return finalize(r, nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
        }
        let headers = [
            ("Etag", etag.as_str()),
            ("Expires", "Thu, 01 Jan 1970 00:00:01 GMT"),
            ("Cache-Control", "no-cache, no-store, must-revalidate"),
        ];
        for (k, v) in headers {
            if http::header_out(r, k, v).is_err() {
                return finalize(r, nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
            }
        }
        let rc = if status == 304 {
            http::send_header_only(r, 304)
        } else {
            http::send_typed_body(r, status, &body)
        };
        finalize(r, rc);
    }
}

/// A query argument, unescaped.
fn arg(r: &ngx_http_request_t, name: &[u8]) -> Option<Vec<u8>> {
    let args = r.args.as_bytes();
    args.split(|&b| b == b'&').find_map(|kv| {
        let (k, v) = kv.split_at(kv.iter().position(|&b| b == b'=')?);
        (k == name && v.len() > 1).then(|| crate::protocol::channels::unescape(&v[1..]))
    })
}

impl Transport for LongPoller {
    fn subscription(&mut self) -> &mut Subscription {
        &mut self.sub
    }

    fn ready(&mut self) {}

    fn accepts(&self) -> bool {
        !self.done
    }

    fn encoding(&self) -> Encoding {
        let identity = self.lcf.template.as_ref().map_or(true, |t| t.is_identity());
        let template = if identity { ptr::null() } else { ptr::from_ref(self.lcf).cast() };
        Encoding { kind: KIND, template }
    }

    fn encode(&self, message: &Values<'_>) -> Rc<[u8]> {
        Rc::from(self.render(message))
    }

    fn queue(&mut self, encoded: Rc<[u8]>, _channel: &str) {
        self.answer.push(encoded);
        self.stamp = lifecycle::current_stamp();
    }

    fn flush(&mut self) {
        if self.done || self.answer.is_empty() {
            return;
        }
        let messages = std::mem::take(&mut self.answer);
        let (sec, tag) = self.stamp;
        self.respond(200, &messages, (sec > 0).then_some((sec, tag)));
    }

    fn going_away(&mut self) {
        if !self.done {
            self.respond(304, &[], None);
        }
    }

    fn reply(&mut self, _rows: Vec<Reply>) {}

    /// The deleted message was its answer already.
    fn finish(&mut self) {}
}
