//! The push-stream fork's HTTP hooks: a subrequest to a location, made for a subscriber
//! whose own HTTP request may be long gone (a WebSocket subscriber frees its request after
//! the `101` to stay small).
//!
//! Each call therefore brings its own parent: a request made the way nginx makes one for
//! a connection, on a connection of our own that has no socket (`fd` -1) and carries the
//! subscriber's addresses and server configuration, copied when it was admitted. The
//! subrequest is an in-memory one (`NGX_HTTP_SUBREQUEST_IN_MEMORY`): any handler may
//! serve it (`proxy_pass`, `return`, another module) and its body is collected by nginx's
//! postpone filter. When it is done, its status and body go to the caller, and the parent
//! and its connection are freed from a posted event, once nginx no longer looks at them.

use core::ffi::c_void;
use core::ptr::NonNull;
use core::{mem, ptr};
use std::cell::Cell;

use nginx_sys::{
    ngx_connection_t, ngx_event_t, ngx_http_connection_t, ngx_http_core_main_conf_t,
    ngx_http_core_srv_conf_t, ngx_http_log_ctx_t, ngx_http_log_handler_pt,
    ngx_http_post_subrequest_t, ngx_http_request_body_t, ngx_http_request_t, ngx_int_t, ngx_list_t,
    ngx_listening_t, ngx_log_t, ngx_posted_events, ngx_str_t, ngx_table_elt_t, NGX_HTTP_GET,
    NGX_HTTP_POST, NGX_HTTP_SUBREQUEST_IN_MEMORY, NGX_HTTP_SUBREQUEST_WAITED, NGX_LOG_WARN,
};
use ngx::http::{HttpModule, NgxHttpCoreModule};

/// Called with the subrequest's status (0 if it never produced one) and body.
pub type Done = Box<dyn FnOnce(usize, &[u8])>;

/// The subscriber's server: what a call needs besides its addresses (kept small: every
/// subscriber of a location with HTTP hooks holds one).
pub struct Server {
    /// Its `ngx_http_connection_t`'s server and address configuration.
    conf_ctx: NonNull<nginx_sys::ngx_http_conf_ctx_t>,
    addr_conf: *mut nginx_sys::ngx_http_addr_conf_t,
    /// Its listening socket, whose log is every connection's template.
    listening: *mut ngx_listening_t,
}

/// A call's origin: the server and the subscriber's addresses.
pub struct Origin<'a> {
    pub server: &'a Server,
    pub sockaddr: &'a [u8],
    /// Empty when it is the listening socket's own address.
    pub local_sockaddr: &'a [u8],
    pub addr_text: &'a [u8],
}

thread_local! {
    /// nginx's HTTP request and connection log handlers, static functions in nginx: taken
    /// from the first subscriber, the same for all.
    static LOG_HANDLERS: Cell<(ngx_http_log_handler_pt, nginx_sys::ngx_log_handler_pt)> =
        const { Cell::new((None, None)) };
}

impl Server {
    /// The server of `r`, and its client address, local address (empty when it is the
    /// listening socket's) and address text.
    ///
    /// # Safety
    /// `r` is a live main request on a client connection.
    pub unsafe fn of(r: &ngx_http_request_t) -> Option<(Self, [&[u8]; 3])> {
        // SAFETY: per the contract
        let c = unsafe { &*r.connection };
        let hc = unsafe { r.http_connection.as_ref()? };
        LOG_HANDLERS.with(|h| h.set((r.log_handler, unsafe { (*c.log).handler })));
        let listening = c.listening;
        let own_local =
            unsafe { listening.as_ref() }.map_or(true, |ls| ls.sockaddr != c.local_sockaddr);
        let local =
            if own_local { bytes(c.local_sockaddr.cast(), c.local_socklen as usize) } else { &[] };
        let server =
            Self { conf_ctx: NonNull::new(hc.conf_ctx)?, addr_conf: hc.addr_conf, listening };
        let sock = bytes(c.sockaddr.cast(), c.socklen as usize);
        Some((server, [sock, local, bytes(c.addr_text.data, c.addr_text.len)]))
    }

    /// The log of the subscriber's listening socket, for lines about its hooks.
    pub fn log(&self) -> *mut ngx_log_t {
        // SAFETY: listening sockets live as long as the cycle, which outlives workers'
        // connections; nginx logs through a shared pointer
        match unsafe { self.listening.as_mut() } {
            Some(ls) => &mut ls.log,
            None => unsafe { (*nginx_sys::ngx_cycle).log },
        }
    }
}

fn bytes<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if p.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: nginx's own pointer and length
        unsafe { core::slice::from_raw_parts(p, len) }
    }
}

/// One hook call in flight. `c` comes first: a connection pointer is the call's pointer.
#[repr(C)]
struct Call {
    c: ngx_connection_t,
    rev: ngx_event_t,
    wev: ngx_event_t,
    log: ngx_log_t,
    log_ctx: ngx_http_log_ctx_t,
    hc: ngx_http_connection_t,
    addrs: Box<[u8]>,
    ps: ngx_http_post_subrequest_t,
    r: *mut ngx_http_request_t,
    name: &'static str,
    target: String,
    uri: Vec<u8>,
    args: Vec<u8>,
    body: Option<Vec<u8>>,
    status: usize,
    out: Vec<u8>,
    finished: bool,
    done: Option<Done>,
}

/// A handle on a call in flight, to let go of its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallRef(*mut Call);

impl CallRef {
    /// The caller is gone: the call completes, its outcome goes nowhere.
    pub fn detach(self) {
        // SAFETY: a call lives until it has reported (its owner clears the ref then)
        unsafe { (*self.0).done = None };
    }
}

fn method_name(name: &'static [u8]) -> ngx_str_t {
    // nginx never writes through a method name
    ngx_str_t { len: name.len(), data: name.as_ptr().cast_mut() }
}

/// Starts a subrequest to `target` (`/uri` or `/uri?args`; without `?`, `default_args`
/// are passed): a POST with `body`, or a GET. Failures (no answer, 4xx/5xx) are logged at
/// `warn` naming `name`. `None` if the call could not start (logged too).
pub fn call(
    origin: &Origin<'_>,
    name: &'static str,
    target: &[u8],
    default_args: &[u8],
    body: Option<Vec<u8>>,
    done: Option<Done>,
) -> Option<CallRef> {
    let (uri, args) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (target[..q].to_vec(), target[q + 1..].to_vec()),
        None => (target.to_vec(), default_args.to_vec()),
    };
    // SAFETY: an all-zero connection, events, log context and post handler are nginx's own
    // starting point; every pointer is set below before nginx sees them
    let mut call = Box::new(unsafe {
        Call {
            c: mem::zeroed(),
            rev: mem::zeroed(),
            wev: mem::zeroed(),
            log: *origin.server.log(),
            log_ctx: mem::zeroed(),
            hc: mem::zeroed(),
            addrs: [origin.sockaddr, origin.local_sockaddr, origin.addr_text].concat().into(),
            ps: mem::zeroed(),
            r: ptr::null_mut(),
            name,
            target: String::from_utf8_lossy(target).into_owned(),
            uri,
            args,
            body,
            status: 0,
            out: Vec::new(),
            finished: false,
            done,
        }
    });
    let raw: *mut Call = ptr::from_mut(&mut *call);
    // SAFETY: every pointer set here points into the boxed call, which stays put
    let started = unsafe { start(raw, origin) };
    if started.is_err() {
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            ptr::addr_of_mut!(call.log),
            "pgpush: {} \"{}\" could not be started",
            name,
            call.target
        );
        // SAFETY: nothing of nginx refers to the call once start() failed
        unsafe { free(raw, false) };
        drop(call);
        return None;
    }
    let _ = Box::into_raw(call);
    crate::nginx::worker::with(|w| w.after_burst());
    Some(CallRef(raw))
}

/// Builds the parent request and its subrequest, and runs it.
unsafe fn start(call: *mut Call, origin: &Origin<'_>) -> Result<(), ()> {
    let k = unsafe { &mut *call };
    let (socklen, local_socklen) = (origin.sockaddr.len(), origin.local_sockaddr.len());
    let sock = k.addrs.as_mut_ptr();
    let local = unsafe { sock.add(socklen) };
    let text = unsafe { local.add(local_socklen) };
    let text_len = origin.addr_text.len();
    let server = origin.server;
    let (log_handler, log_error) = LOG_HANDLERS.with(Cell::get);

    k.hc.conf_ctx = server.conf_ctx.as_ptr();
    k.hc.addr_conf = server.addr_conf;
    k.log_ctx.connection = &mut k.c;
    k.log.handler = log_error;
    k.log.data = ptr::addr_of_mut!(k.log_ctx).cast();
    k.log.action = c"running a pgpush hook".as_ptr().cast_mut();

    let c = &mut k.c;
    c.fd = -1;
    c.data = ptr::addr_of_mut!(k.hc).cast();
    c.read = &mut k.rev;
    c.write = &mut k.wev;
    c.log = &mut k.log;
    c.listening = server.listening;
    c.sockaddr = sock.cast();
    c.socklen = socklen as u32;
    if local_socklen > 0 {
        c.local_sockaddr = local.cast();
        c.local_socklen = local_socklen as u32;
    } else if let Some(ls) = unsafe { server.listening.as_ref() } {
        c.local_sockaddr = ls.sockaddr;
        c.local_socklen = ls.socklen;
    }
    c.addr_text = ngx_str_t { len: text_len, data: text };
    // SAFETY: ngx_io is nginx's I/O table; a write to fd -1 fails, it is never reached
    unsafe {
        c.recv = nginx_sys::ngx_io.recv;
        c.send = nginx_sys::ngx_io.send;
        c.recv_chain = nginx_sys::ngx_io.recv_chain;
        c.send_chain = nginx_sys::ngx_io.send_chain;
    }
    c.set_sndlowat(1);
    // no socket to tune
    c.set_tcp_nodelay(nginx_sys::ngx_connection_tcp_nodelay_e_NGX_TCP_NODELAY_DISABLED);
    // both events count as registered, so that nginx never adds fd -1 to epoll; writing
    // is always possible (an in-memory subrequest writes nothing), reading never
    k.rev.data = ptr::addr_of_mut!(k.c).cast();
    k.rev.log = &mut k.log;
    k.rev.set_active(1);
    k.wev.data = ptr::addr_of_mut!(k.c).cast();
    k.wev.log = &mut k.log;
    k.wev.set_write(1);
    k.wev.set_active(1);
    k.wev.set_ready(1);

    let pool = unsafe { nginx_sys::ngx_create_pool(1024, &mut k.log) };
    if pool.is_null() {
        return Err(());
    }
    k.c.pool = pool;

    let r = unsafe { alloc_request(&mut k.c) }.ok_or(())?;
    k.r = r;
    // SAFETY: r is fresh
    unsafe { (*r).log_handler = log_handler };
    k.c.data = r.cast();
    k.log_ctx.request = r;
    k.log_ctx.current_request = r;
    let req = unsafe { &mut *r };
    req.method = NGX_HTTP_GET as usize;
    req.write_event_handler = Some(parent_done);

    if let Some(body) = k.body.as_mut() {
        let rb = unsafe {
            nginx_sys::ngx_pcalloc(req.pool, mem::size_of::<ngx_http_request_body_t>())
                .cast::<ngx_http_request_body_t>()
        };
        let b = unsafe {
            nginx_sys::ngx_pcalloc(req.pool, mem::size_of::<nginx_sys::ngx_buf_t>())
                .cast::<nginx_sys::ngx_buf_t>()
        };
        let cl = unsafe { nginx_sys::ngx_alloc_chain_link(req.pool) };
        if rb.is_null() || b.is_null() || cl.is_null() {
            return Err(());
        }
        unsafe {
            let b = &mut *b;
            b.start = body.as_mut_ptr();
            b.pos = b.start;
            b.last = b.start.add(body.len());
            b.end = b.last;
            b.set_memory(1);
            b.set_last_buf(1);
            (*cl).buf = b;
            (*cl).next = ptr::null_mut();
            (*rb).bufs = cl;
        }
        req.request_body = rb;
        req.headers_in.content_length_n = body.len() as i64;
    }

    k.ps.handler = Some(subrequest_done);
    k.ps.data = call.cast();
    let mut uri = ngx_str_t { len: k.uri.len(), data: k.uri.as_mut_ptr() };
    let mut args = ngx_str_t { len: k.args.len(), data: k.args.as_mut_ptr() };
    let mut sr: *mut ngx_http_request_t = ptr::null_mut();
    let flags = (NGX_HTTP_SUBREQUEST_IN_MEMORY | NGX_HTTP_SUBREQUEST_WAITED) as usize;
    let rc = unsafe {
        nginx_sys::ngx_http_subrequest(r, &mut uri, &mut args, &mut sr, &mut k.ps, flags)
    };
    if rc != nginx_sys::NGX_OK as ngx_int_t || sr.is_null() {
        return Err(());
    }
    if k.body.is_some() {
        unsafe {
            (*sr).method = NGX_HTTP_POST as usize;
            (*sr).method_name = method_name(b"POST");
        }
    } else {
        unsafe { (*sr).method_name = method_name(b"GET") };
    }
    unsafe { nginx_sys::ngx_http_run_posted_requests(&mut k.c) };
    Ok(())
}

/// `ngx_http_alloc_request`, which nginx 1.22 does not export: a main request on `c`,
/// whose `data` is its `ngx_http_connection_t`.
unsafe fn alloc_request(c: &mut ngx_connection_t) -> Option<*mut ngx_http_request_t> {
    let hc = unsafe { &*c.data.cast::<ngx_http_connection_t>() };
    let ctx = unsafe { &*hc.conf_ctx };
    let cscf = unsafe {
        &*(*ctx.srv_conf.add(NgxHttpCoreModule::module().ctx_index))
            .cast::<ngx_http_core_srv_conf_t>()
    };
    let cmcf = unsafe {
        &*(*ctx.main_conf.add(NgxHttpCoreModule::module().ctx_index))
            .cast::<ngx_http_core_main_conf_t>()
    };
    let pool = unsafe { nginx_sys::ngx_create_pool(cscf.request_pool_size, c.log) };
    if pool.is_null() {
        return None;
    }
    let fail = || {
        unsafe { nginx_sys::ngx_destroy_pool(pool) };
        None
    };
    let r = unsafe {
        nginx_sys::ngx_pcalloc(pool, mem::size_of::<ngx_http_request_t>())
            .cast::<ngx_http_request_t>()
    };
    if r.is_null() {
        return fail();
    }
    let req = unsafe { &mut *r };
    req.pool = pool;
    req.http_connection = c.data.cast();
    req.signature = nginx_sys::NGX_HTTP_MODULE as _;
    req.connection = c;
    req.main_conf = ctx.main_conf;
    req.srv_conf = ctx.srv_conf;
    req.loc_conf = ctx.loc_conf;
    req.read_event_handler = Some(nginx_sys::ngx_http_block_reading);
    let ok = unsafe {
        list_init(&mut req.headers_out.headers, pool, 20)
            && list_init(&mut req.headers_out.trailers, pool, 4)
            && list_init(&mut req.headers_in.headers, pool, 1)
    };
    if !ok {
        return fail();
    }
    req.ctx = unsafe {
        nginx_sys::ngx_pcalloc(pool, mem::size_of::<*mut c_void>() * nginx_sys::ngx_http_max_module)
            .cast()
    };
    req.variables = unsafe {
        nginx_sys::ngx_pcalloc(
            pool,
            cmcf.variables.nelts * mem::size_of::<nginx_sys::ngx_http_variable_value_t>(),
        )
        .cast()
    };
    if req.ctx.is_null() || req.variables.is_null() {
        return fail();
    }
    req.main = r;
    req.set_count(1);
    // SAFETY: nginx's cached time
    let tp = unsafe { &*nginx_sys::ngx_cached_time };
    req.start_sec = tp.sec;
    req.start_msec = tp.msec;
    req.method = nginx_sys::NGX_HTTP_UNKNOWN as usize;
    req.http_version = nginx_sys::NGX_HTTP_VERSION_10 as usize;
    req.headers_in.content_length_n = -1;
    req.headers_in.keep_alive_n = -1;
    req.headers_out.content_length_n = -1;
    req.headers_out.last_modified_time = -1;
    req.set_uri_changes(nginx_sys::NGX_HTTP_MAX_URI_CHANGES + 1);
    req.set_subrequests(nginx_sys::NGX_HTTP_MAX_SUBREQUESTS + 1);
    req.set_http_state(nginx_sys::ngx_http_state_e_NGX_HTTP_PROCESS_REQUEST_STATE as _);
    Some(r)
}

unsafe fn list_init(l: &mut ngx_list_t, pool: *mut nginx_sys::ngx_pool_t, n: usize) -> bool {
    let size = mem::size_of::<ngx_table_elt_t>();
    l.part.elts = unsafe { nginx_sys::ngx_palloc(pool, n * size) };
    l.part.nelts = 0;
    l.part.next = ptr::null_mut();
    l.last = &mut l.part;
    l.size = size;
    l.nalloc = n;
    l.pool = pool;
    !l.part.elts.is_null()
}

/// The subrequest is finalized: keep its status and in-memory body.
extern "C" fn subrequest_done(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    // SAFETY: data is the call; sr is alive during its post handler
    let (k, sr) = unsafe { (&mut *data.cast::<Call>(), &*sr) };
    k.status = match sr.headers_out.status {
        0 if rc >= 100 => rc as usize,
        0 => 0,
        s => s,
    };
    let mut cl = sr.out;
    // SAFETY: the in-memory body chain lives in the request pool
    while let Some(link) = unsafe { cl.as_ref() } {
        let b = unsafe { &*link.buf };
        if !b.pos.is_null() && b.in_file() == 0 {
            k.out.extend_from_slice(bytes(b.pos, unsafe { b.last.offset_from(b.pos) } as usize));
        }
        cl = link.next;
    }
    rc
}

/// The parent's write handler, run once the subrequest is done.
extern "C" fn parent_done(r: *mut ngx_http_request_t) {
    // SAFETY: the parent's connection is the call's first field
    let call = unsafe { (*r).connection.cast::<Call>() };
    let k = unsafe { &mut *call };
    if k.finished {
        return;
    }
    k.finished = true;
    if !(200..300).contains(&k.status) {
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            &mut k.log,
            "pgpush: {} \"{}\" failed with status {}",
            k.name,
            k.target,
            k.status
        );
    }
    // the outcome is reported from a posted event, never from inside the caller (the
    // subrequest may complete within call()); nginx still looks at this connection when
    // this handler returns, so it is freed from there too
    k.rev.handler = Some(free_posted);
    // SAFETY: our own event, posted once
    unsafe { nginx_sys::ngx_post_event(&mut k.rev, ptr::addr_of_mut!(ngx_posted_events)) };
}

extern "C" fn free_posted(ev: *mut ngx_event_t) {
    // SAFETY: the event's data is the call's connection, its first field
    let call = unsafe { (*ev).data.cast::<Call>() };
    let k = unsafe { &mut *call };
    if let Some(done) = k.done.take() {
        let out = mem::take(&mut k.out);
        done(k.status, &out);
    }
    unsafe { free(call, true) };
}

/// Frees the parent request, the connection's pool and, if `boxed`, the call.
unsafe fn free(call: *mut Call, boxed: bool) {
    let k = unsafe { &mut *call };
    if !k.r.is_null() {
        // SAFETY: the parent is ours; it is not logged (its subrequest is, by the hook's
        // location)
        unsafe {
            (*k.r).set_logged(1);
            nginx_sys::ngx_http_free_request(k.r, 0);
        }
        k.r = ptr::null_mut();
    }
    if !k.c.pool.is_null() {
        unsafe { nginx_sys::ngx_destroy_pool(k.c.pool) };
        k.c.pool = ptr::null_mut();
    }
    if boxed {
        drop(unsafe { Box::from_raw(call) });
    }
}
