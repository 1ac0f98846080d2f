//! Everything that touches nginx. This file is the module declaration and its hooks; the
//! layers below it depend on each other one way only:
//!
//! ```text
//! dispatch (bridge events)   transports/ (websocket)   publisher
//!              \                  |                   /
//!                          lifecycle
//!                              |
//!                           worker            http (request helpers)
//!                              |                /
//!                            conf (types; directives)
//! ```
//!
//! and all of them over the pure cores (`config`, `hub`, `postgres`, `protocol`).
//!
//! `extern "C"` callbacks stay short: they cast, call safe Rust that returns a `Result`, and
//! convert to an nginx status once.

pub mod conf;
mod dispatch;
mod events;
mod hooks;
mod http;
mod lifecycle;
mod node;
mod publisher;
mod stats;
mod transports;
mod worker;
mod zone;

use core::ffi::{c_char, c_void};
use core::ptr;

use nginx_sys::{
    ngx_conf_t, ngx_core_conf_t, ngx_cycle_t, ngx_http_handler_pt, ngx_http_module_t, ngx_int_t,
    ngx_module_t, ngx_uint_t, NGX_HTTP_MODULE, NGX_LOG_EMERG,
};
use ngx::core::{Status, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf};

use self::conf::{LocConf, MainConf, NGX_HTTP_PGPUSH_COMMANDS};

#[derive(Debug)]
pub struct HttpPgPushModule;

static NGX_HTTP_PGPUSH_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: None,
    create_main_conf: Some(HttpPgPushModule::create_main_conf),
    init_main_conf: Some(HttpPgPushModule::init_main_conf),
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(HttpPgPushModule::create_loc_conf),
    merge_loc_conf: Some(HttpPgPushModule::merge_loc_conf),
};

#[cfg(feature = "export-modules")]
ngx::ngx_modules!(ngx_http_pgpush_module);

#[used]
#[allow(non_upper_case_globals)]
#[cfg_attr(not(feature = "export-modules"), no_mangle)]
pub static mut ngx_http_pgpush_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(NGX_HTTP_PGPUSH_MODULE_CTX).cast_mut().cast(),
    // SAFETY: nginx reads the command table during configuration only
    commands: unsafe { ptr::addr_of_mut!(NGX_HTTP_PGPUSH_COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_master: None,
    init_module: Some(init_module),
    init_process: Some(init_process),
    init_thread: None,
    exit_thread: None,
    exit_process: Some(exit_process),
    exit_master: None,
    ..ngx_module_t::default()
};

unsafe impl HttpModuleMainConf for HttpPgPushModule {
    type MainConf = MainConf;
}

unsafe impl HttpModuleLocationConf for HttpPgPushModule {
    type LocationConf = LocConf;
}

impl HttpModule for HttpPgPushModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module is a static that nginx only writes during init
        unsafe { &*ptr::addr_of!(ngx_http_pgpush_module) }
    }

    unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
        // SAFETY: conf is the MainConf created by create_main_conf; cf is being parsed
        let (cf, mcf) = unsafe { (&mut *cf, &mut *conf.cast::<MainConf>()) };
        mcf.init();
        if mcf.has_push_locations && zone::add(cf, mcf).is_err() {
            return NGX_CONF_ERROR;
        }
        NGX_CONF_OK
    }

    unsafe extern "C" fn merge_loc_conf(
        cf: *mut ngx_conf_t,
        prev: *mut c_void,
        conf: *mut c_void,
    ) -> *mut c_char {
        use ngx::http::Merge;
        // SAFETY: both are LocConf created by create_loc_conf; cf is valid during merge
        let (cf, prev, conf) =
            unsafe { (&mut *cf, &*prev.cast::<LocConf>(), &mut *conf.cast::<LocConf>()) };
        let main = HttpPgPushModule::main_conf(&*cf)
            .map(|m| conf::MainChecks {
                has_postgres: m.postgres.is_some(),
                has_wildcard_prefix: !m.wildcard_channel_prefix.is_empty(),
                max_wildcard_channels: MainConf::limit(m.max_number_of_wildcard_channels),
            })
            .unwrap_or_default();
        let own_role = conf.has_own_role();
        if conf.merge(prev).is_err() || conf.check(cf, &main).is_err() {
            return NGX_CONF_ERROR;
        }
        if conf.subscriber.is_some() && conf.sql_hooks().next().is_some() {
            if let Some(mcf) = HttpPgPushModule::main_conf_mut(&*cf) {
                mcf.has_sql_hooks = true;
            }
        }
        if (conf.publisher.is_some() || conf.websocket_allow_publish == 1)
            && conf.store_messages == 1
        {
            if let Some(mcf) = HttpPgPushModule::main_conf_mut(&*cf) {
                mcf.store = true;
            }
        }
        if !own_role {
            // an inherited role: an `if` block keeps its location's handler, and a nested
            // location gets none (as in push-stream, whose directives set the handler)
            return NGX_CONF_OK;
        }
        set_handler(cf, conf)
    }
}

/// Gives a location the content handler of its role.
fn set_handler(cf: &mut ngx_conf_t, lcf: &LocConf) -> *mut c_char {
    use ngx::http::NgxHttpCoreModule;
    let handler: ngx_http_handler_pt = if lcf.subscriber.is_some() {
        Some(transports::handler)
    } else if lcf.publisher.is_some() {
        Some(publisher::handler)
    } else if lcf.channels_statistics {
        Some(stats::handler)
    } else {
        return NGX_CONF_OK;
    };
    // during a location's merge, cf's location confs are that location's
    match NgxHttpCoreModule::location_conf_mut(cf) {
        Some(clcf) => {
            clcf.handler = handler;
            NGX_CONF_OK
        }
        None => NGX_CONF_ERROR,
    }
}

extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the current cycle
    let cycle = unsafe { &mut *cycle };
    match worker::start(cycle, Some(dispatch::on_bridge), events::destroyed) {
        Ok(()) => Status::NGX_OK.into(),
        Err(msg) => {
            ngx::ngx_log_error!(nginx_sys::NGX_LOG_ALERT, cycle.log, "pgpush: {}", msg);
            Status::NGX_ERROR.into()
        }
    }
}

extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    // a graceful quit has answered everyone already (dispatch's shutdown, when nginx closed
    // the bridge); a fast one (TERM, INT) comes straight here, and subscribers still get
    // their end of stream, as push-stream gives them
    if worker::with(|_| ()).is_some() {
        dispatch::shutdown();
    }
}

/// Runs in the master after the whole configuration is read (also for `nginx -t`), when
/// `worker_processes` is known wherever it was written.
extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the new cycle
    let cycle = unsafe { &mut *cycle };
    if check_workers(cycle).is_err() {
        return Status::NGX_ERROR.into();
    }
    // a failure here would end the master on a reload: each worker then listens alone
    if let Err(msg) = node::prepare(cycle, HttpPgPushModule::main_conf(cycle)) {
        ngx::ngx_log_error!(
            nginx_sys::NGX_LOG_WARN,
            cycle.log,
            "pgpush: {}; every worker listens for itself",
            msg
        );
    }
    Status::NGX_OK.into()
}

/// Without PostgreSQL every worker is an island: a message published in one worker would
/// never reach subscribers held by another. Refuse that instead of losing messages.
fn check_workers(cycle: &mut ngx_cycle_t) -> Result<(), ()> {
    let mcf = HttpPgPushModule::main_conf(cycle);
    if !mcf.is_some_and(|m| m.has_push_locations || m.postgres.is_some()) {
        // push-stream's notice, which its own setup specs look for
        ngx::ngx_log_error!(
            nginx_sys::NGX_LOG_WARN,
            cycle.log,
            "ngx_http_push_stream_module will not be used with this configuration. (pgpush is \
             loaded, but no location uses it)"
        );
    }
    let Some(mcf) = mcf else {
        return Ok(());
    };
    if !mcf.has_push_locations || mcf.postgres.is_some() {
        return Ok(());
    }
    // SAFETY: the core module's conf is always present in a cycle's conf_ctx
    let ccf = unsafe {
        let ctx = cycle.conf_ctx;
        &*(*ctx.add(nginx_sys::ngx_core_module.index)).cast::<ngx_core_conf_t>()
    };
    if ccf.master != 0 && ccf.worker_processes > 1 {
        ngx::ngx_log_error!(
            NGX_LOG_EMERG,
            cycle.log,
            "\"worker_processes {}\" needs \"push_stream_postgres\": pgpush workers exchange \
             messages only through PostgreSQL, so without it a message published in one worker \
             would never reach subscribers of another; set \"push_stream_postgres\" or use \
             \"worker_processes 1\"",
            ccf.worker_processes
        );
        return Err(());
    }
    Ok(())
}
