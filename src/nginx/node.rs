//! `push_stream_postgres_node_listener on`: the socket pairs between a node's workers
//! ([`crate::postgres::node`]), made by the master before it forks the workers, so that a
//! worker nginx respawns finds its pair again.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use nginx_sys::{ngx_core_conf_t, ngx_cycle_t};

use crate::nginx::conf::MainConf;
use crate::postgres::node::Peers;

/// The pairs of the current configuration, in the master (inherited by the workers):
/// `(leader's end, worker's end)` for worker 1, 2, …; index 0 is unused.
static PAIRS: Mutex<Vec<(RawFd, RawFd)>> = Mutex::new(Vec::new());

/// The most workers one listener serves (a worker is a bit of a 64-bit mask).
const MAX_WORKERS: usize = 64;

fn close_all(pairs: &mut Vec<(RawFd, RawFd)>) {
    for (a, b) in pairs.drain(..) {
        for fd in [a, b] {
            if fd >= 0 {
                // SAFETY: our own descriptors
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// In the master, for each configuration (start and reload): the previous pairs are
/// closed (old workers keep their own copies) and new ones made when the node listener
/// is on and there is more than one worker.
pub fn prepare(cycle: &ngx_cycle_t, mcf: Option<&MainConf>) -> Result<(), String> {
    let mut pairs = PAIRS.lock().unwrap_or_else(|e| e.into_inner());
    close_all(&mut pairs);
    if !mcf.is_some_and(|m| m.postgres.is_some() && m.postgres_node_listener == 1) {
        return Ok(());
    };
    // SAFETY: the core module's conf is always present in a cycle's conf_ctx
    let ccf = unsafe {
        &*(*cycle.conf_ctx.add(nginx_sys::ngx_core_module.index)).cast::<ngx_core_conf_t>()
    };
    let workers = usize::try_from(ccf.worker_processes).unwrap_or(0);
    if workers > MAX_WORKERS {
        return Err(format!(
            "\"push_stream_postgres_node_listener on\" serves at most {MAX_WORKERS} workers, \
             not {workers}"
        ));
    }
    // SAFETY: a global nginx sets before init_module
    if unsafe { nginx_sys::ngx_test_config } != 0 || ccf.master == 0 || workers < 2 {
        return Ok(());
    }
    pairs.push((-1, -1));
    for _ in 1..workers {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            close_all(&mut pairs);
            return Err(format!("socketpair() failed: {e}"));
        }
        pairs.push((fds[0], fds[1]));
    }
    Ok(())
}

/// In worker `me`: its part of the node, every descriptor it does not need closed.
pub fn peers(me: usize) -> Peers {
    let mut pairs = PAIRS.lock().unwrap_or_else(|e| e.into_inner());
    if pairs.len() < 2 || me >= pairs.len() {
        close_all(&mut pairs);
        return Peers::Alone;
    }
    let mut followers = Vec::new();
    let mut leader = None;
    for (w, (a, b)) in pairs.drain(..).enumerate() {
        let (keep, close) = match (me, w) {
            (_, 0) => (None, [a, b]),
            (0, _) => (Some(a), [b, -1]),
            (me, w) if me == w => (Some(b), [a, -1]),
            _ => (None, [a, b]),
        };
        for fd in close.into_iter().filter(|fd| *fd >= 0) {
            // SAFETY: this worker's copy of a descriptor it does not use
            unsafe { libc::close(fd) };
        }
        // SAFETY: a descriptor this worker now owns alone
        let sock = keep.map(|fd| unsafe { UnixDatagram::from_raw_fd(fd) });
        if me == 0 {
            followers.push(sock);
        } else if sock.is_some() {
            leader = sock;
        }
    }
    match leader {
        Some(leader) => Peers::Follower { leader },
        None if me == 0 => Peers::Leader { me, followers },
        None => Peers::Alone,
    }
}
