//! What the benchmarks share: the machine they ran on, and the CPU and
//! memory a set of processes used.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use serde_json::{json, Value};

/// A comma-separated list argument (`--nodes 4,8,16`), each item parsed;
/// `what` names the flag in the error.
pub fn parse_list<T: FromStr>(value: &str, what: &str) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    value
        .split(',')
        .map(|v| v.trim().parse().with_context(|| format!("{what}: {v:?}")))
        .collect()
}

/// The machine a benchmark ran on (its numbers mean nothing without it).
pub fn machine_info() -> Value {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    json!({
        "nproc": nproc,
        "loadavg_at_end": loadavg,
        "cpu": cpu,
        "kernel": kernel,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// CPU time (user + system) a process has used so far, from
/// `/proc/PID/stat`; `None` once it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Resident memory of a process in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The CPU that `pids` used together over `window`, as a fraction of one
/// core (1.0 = one core busy all the time).
pub fn cpu_share(pids: &[u32], window: Duration) -> f64 {
    let before: Vec<Option<Duration>> = pids.iter().map(|p| cpu_time(*p)).collect();
    let start = Instant::now();
    std::thread::sleep(window);
    let elapsed = start.elapsed();
    let used: Duration = pids
        .iter()
        .zip(before)
        .filter_map(|(p, b)| Some(cpu_time(*p)?.saturating_sub(b?)))
        .sum();
    used.as_secs_f64() / elapsed.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let t0 = cpu_time(me).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_time(me).unwrap() >= t0);
        assert!(rss_bytes(me).unwrap() > 1 << 20);
        assert_eq!(cpu_time(u32::MAX), None);
    }
}
