//! CPU time from /proc, for the benchmarks' accounts of where the time went.

/// CPU seconds (user + system) of process `pid`; `None` if it cannot be read (gone).
pub fn seconds(pid: u32) -> Option<f64> {
    Some(times(pid)?[..2].iter().sum::<f64>() / clock_ticks())
}

/// CPU seconds of process `pid` and of the children it has reaped.
fn seconds_with_reaped(pid: u32) -> Option<f64> {
    Some(times(pid)?.iter().sum::<f64>() / clock_ticks())
}

/// utime, stime, cutime and cstime of `pid`, in clock ticks.
fn times(pid: u32) -> Option<[f64; 4]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some([field(11)?, field(12)?, field(13)?, field(14)?])
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// CPU seconds of every process named `name`, with the children each has reaped: a
/// PostgreSQL backend or worker that exits moves its time into the postmaster's, so a
/// difference of two readings still counts it (one that starts and exits between them
/// counts as well).
pub fn seconds_of(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .filter_map(seconds_with_reaped)
        .sum()
}

/// Busy CPU seconds of the whole machine so far (every core; all but idle and I/O wait);
/// `None` if /proc/stat cannot be read.
pub fn machine_busy() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    // cpu  user nice system idle iowait irq softirq steal
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    if fields.len() < 8 {
        return None;
    }
    Some((fields.iter().sum::<f64>() - fields[3] - fields[4]) / clock_ticks())
}
