//! Memory and CPU of other processes (the nginx workers, the PostgreSQL backends), read
//! from /proc. Linux only.

use std::fs;

/// Totals over a set of processes at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// How many of the processes could be read.
    pub processes: usize,
    /// Sum of VmRSS, in KiB. Pages shared between the processes (nginx's shared memory
    /// zones) are counted once per process that touched them.
    pub rss_kb: u64,
    /// Sum of Pss (proportional set size), in KiB: shared pages are split between the
    /// processes sharing them, so the sum counts each page once.
    pub pss_kb: u64,
    /// CPU time (user + system) in nanoseconds: from the threads' schedstat, which counts
    /// nanoseconds, or else from utime + stime, which count 10 ms clock ticks.
    pub cpu_ns: u64,
}

impl Sample {
    /// CPU time in microseconds.
    pub fn cpu_us(&self) -> u64 {
        self.cpu_ns / 1000
    }
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// The numeric fields of /proc/PID/stat after the command name (which may hold spaces and
/// parentheses, so the split is at the last ')') and the state: index 0 is the ppid, 10
/// utime and 11 stime.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect())
}

/// The live children of `parent`, in pid order.
pub fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if stat_fields(pid).and_then(|f| f.first().copied()) == Some(u64::from(parent)) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kb_field(&text, key)
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn pss_kb(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kb_field(&text, "Pss:")
}

/// The CPU time of every live thread of `pid`, in nanoseconds (the first field of
/// /proc/PID/task/TID/schedstat).
fn schedstat_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        // A thread that ended meanwhile is skipped.
        let Ok(text) = fs::read_to_string(task.path().join("schedstat")) else { continue };
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Sums memory and CPU over `pids`; processes that are gone are skipped.
pub fn sample(pids: &[u32]) -> Sample {
    let mut s = Sample::default();
    for &pid in pids {
        let Some(fields) = stat_fields(pid) else { continue };
        let Some(rss) = status_kb(pid, "VmRSS:") else { continue };
        s.processes += 1;
        s.rss_kb += rss;
        s.pss_kb += pss_kb(pid).unwrap_or(rss);
        s.cpu_ns += schedstat_ns(pid).unwrap_or_else(|| {
            let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
            ticks.saturating_mul(1_000_000_000) / clock_ticks_per_second()
        });
    }
    s
}

/// A group of processes watched across the run: a parent and its children, found anew at
/// each sample (nginx workers, or the postmaster and its backends).
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub parent: u32,
    pub include_parent: bool,
}

impl Group {
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = children(self.parent);
        if self.include_parent {
            pids.insert(0, self.parent);
        }
        pids
    }

    pub fn sample(&self) -> Sample {
        sample(&self.pids())
    }
}

/// This process's own CPU time (user + system), in microseconds.
pub fn self_cpu_us() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let s = sample(&[me]);
        assert_eq!(s.processes, 1);
        assert!(s.rss_kb > 0);
        assert!(s.pss_kb > 0);
        assert!(s.cpu_ns > 0);
        let ppid = stat_fields(me).unwrap()[0] as u32;
        assert!(children(ppid).contains(&me));
    }

    #[test]
    fn parses_kb_fields() {
        let text = "Name:\tnginx\nVmRSS:\t   1234 kB\nVmSwap:\t0 kB\n";
        assert_eq!(kb_field(text, "VmRSS:"), Some(1234));
        assert_eq!(kb_field(text, "Pss:"), None);
    }
}
