//! This process's CPU time (Linux `/proc/self/stat`): whether in-process servers are still
//! computing after a request ended.

use std::time::{Duration, Instant};

/// User + system CPU time of this process, every thread included (10 ms resolution).
pub fn process_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // After the command name (in parentheses): state is field 3, utime field 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let ticks: u64 = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse::<u64>().expect("a tick count"))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Waits until the process uses under 10% of one core over a 200 ms window and returns how
/// long that took; panics when it is still busy after `limit`.
pub async fn until_cpu_quiet(limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let (cpu, wall) = (process_cpu_time(), Instant::now());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let used = (process_cpu_time() - cpu).as_secs_f64();
        if used < 0.1 * wall.elapsed().as_secs_f64() {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "still computing {:?} later ({used:.2} s CPU in the last window)",
            t.elapsed()
        );
    }
}
