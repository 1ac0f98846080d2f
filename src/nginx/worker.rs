//! Per-worker lifecycle: the side connection starts in `init_process` and stops in
//! `exit_process`; its bridge's eventfd is an nginx read event on a private connection.

use core::ptr;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use nginx_sys::{
    ngx_close_connection, ngx_connection_t, ngx_cycle_t, ngx_event_t, ngx_get_connection,
    ngx_handle_read_event, ngx_int_t, ngx_log_t, NGX_LOG_ALERT, NGX_LOG_DEBUG, NGX_LOG_ERR,
    NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
use ngx::core::Status;
use ngx::http::HttpModuleMainConf;

use crate::nginx::HttpPgPushModule;
use crate::postgres::{Bridge, Event, Level, SideConnection};

/// How long `exit_process` waits for the tokio side to close its connection.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Events handled per wakeup before yielding back to the event loop.
const BATCH: usize = 1024;

struct Worker {
    bridge: Arc<Bridge>,
    side: Option<SideConnection>,
    conn: *mut ngx_connection_t,
    log: *mut ngx_log_t,
}

thread_local! {
    // Only the worker's main thread ever touches this.
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

pub extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the current cycle
    let cycle = unsafe { &mut *cycle };
    match start(cycle) {
        Ok(()) => Status::NGX_OK.into(),
        Err(msg) => {
            ngx::ngx_log_error!(NGX_LOG_ALERT, cycle.log, "pgpush: {}", msg);
            Status::NGX_ERROR.into()
        }
    }
}

pub extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    stop();
}

fn start(cycle: &mut ngx_cycle_t) -> Result<(), String> {
    // init_process also runs in the cache manager and loader: only workers relay.
    // SAFETY: ngx_process is set before init_process runs
    let process = unsafe { nginx_sys::ngx_process } as u32;
    if process != NGX_PROCESS_WORKER && process != NGX_PROCESS_SINGLE {
        return Ok(());
    }
    let Some(mcf) = HttpPgPushModule::main_conf(cycle) else {
        return Ok(());
    };
    let Some(conninfo) = mcf.postgres.as_ref() else {
        return Ok(());
    };
    let reconnect = mcf.postgres_reconnect.unwrap_or_default();

    let bridge = Bridge::new().map_err(|e| format!("eventfd() failed: {e}"))?;

    // nginx gets its own descriptor: it closes it with the connection, while the tokio
    // side may still hold the bridge.
    // SAFETY: duplicating a valid fd
    let fd = unsafe { libc::fcntl(bridge.raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("fcntl(F_DUPFD_CLOEXEC) failed: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd and the cycle log
    let c = unsafe { ngx_get_connection(fd, cycle.log) };
    if c.is_null() {
        // SAFETY: fd is ours
        unsafe { libc::close(fd) };
        return Err("no free connection for the eventfd".into());
    }
    // SAFETY: c is a fresh connection from nginx's pool
    unsafe {
        let c = &mut *c;
        (*c.read).handler = Some(on_bridge);
        (*c.read).log = cycle.log;
        c.log = cycle.log;
        // idle: on quit or reload nginx calls the read handler with c->close set
        c.set_idle(1);
        if ngx_handle_read_event(c.read, 0) != nginx_sys::NGX_OK as ngx_int_t {
            ngx_close_connection(c);
            return Err("cannot watch the eventfd".into());
        }
    }

    // SAFETY: ngx_worker is set before init_process
    let worker = unsafe { nginx_sys::ngx_worker };
    let side = SideConnection::start(conninfo.config().clone(), reconnect, bridge.clone(), worker)
        .map_err(|e| format!("cannot start the postgres thread: {e}"))?;

    WORKER.with(|w| {
        *w.borrow_mut() = Some(Worker { bridge, side: Some(side), conn: c, log: cycle.log });
    });
    Ok(())
}

/// Stops the side thread (bounded) and closes the eventfd connection. Idempotent.
fn stop() {
    let Some(mut w) = WORKER.with(|w| w.borrow_mut().take()) else {
        return;
    };
    if let Some(side) = w.side.take() {
        if !side.stop(SHUTDOWN_TIMEOUT) {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                w.log,
                "pgpush: postgres thread did not stop within {}ms, leaving it",
                SHUTDOWN_TIMEOUT.as_millis()
            );
        }
    }
    // the thread may have left log lines behind
    flush_logs(&w);
    if !w.conn.is_null() {
        // SAFETY: our connection, closed once
        unsafe { ngx_close_connection(w.conn) };
        w.conn = ptr::null_mut();
    }
}

extern "C" fn on_bridge(ev: *mut ngx_event_t) {
    // SAFETY: ev belongs to our eventfd connection
    let c = unsafe { (*ev).data.cast::<ngx_connection_t>() };
    // SAFETY: c is alive while its events fire
    if unsafe { (*c).close() } != 0 {
        // graceful shutdown or reload: let go of the database now
        stop();
        return;
    }
    WORKER.with(|w| {
        let w = w.borrow();
        let Some(w) = w.as_ref() else { return };
        w.bridge.drain_wakeups();
        let mut events = Vec::new();
        let drained = w.bridge.take(&mut events, BATCH);
        for e in events {
            handle(w, e);
        }
        if !drained {
            // come back for the rest after other connections had their turn
            w.bridge.wake();
        }
    });
}

fn handle(w: &Worker, e: Event) {
    match e {
        Event::Log { level, msg } => log(w.log, level, &msg),
        Event::Notification { channel, payload } => {
            ngx::ngx_log_debug!(
                w.log,
                "pgpush: notification on \"{}\", {} bytes",
                channel,
                payload.len()
            );
        }
        Event::Connected { .. } | Event::Disconnected => {}
    }
}

fn flush_logs(w: &Worker) {
    let mut events = Vec::new();
    w.bridge.take(&mut events, usize::MAX);
    for e in events {
        if let Event::Log { level, msg } = e {
            log(w.log, level, &msg);
        }
    }
}

fn log(log: *mut ngx_log_t, level: Level, msg: &str) {
    let level = match level {
        Level::Alert => NGX_LOG_ALERT,
        Level::Error => NGX_LOG_ERR,
        Level::Warn => NGX_LOG_WARN,
        Level::Notice => NGX_LOG_NOTICE,
        Level::Info => NGX_LOG_INFO,
        Level::Debug => NGX_LOG_DEBUG,
    };
    ngx::ngx_log_error!(level, log, "pgpush: {}", msg);
}
