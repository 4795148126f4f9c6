//! A CPU's busy time, exactly: wall time less the time cpuidle says the CPU
//! spent idle. /proc/stat's busy time is sampled at the tick, and a paced
//! sender's bursts can fall between ticks or on them.

use std::{path::Path, time::Instant};

use anyhow::{Context as _, ensure};

/// Microseconds the CPUs (CPU `only`, or all) have spent idle so far, and
/// how many CPUs that is. A CPU's counter only grows when it leaves an idle
/// state, so it is exact for the CPU that reads it, and behind by at most
/// the current idle period for another.
fn idle_us(only: Option<usize>) -> anyhow::Result<(u64, usize)> {
    let mut total = 0;
    let mut cpus = 0;
    for cpu in std::fs::read_dir("/sys/devices/system/cpu")?.flatten() {
        let name = cpu.file_name();
        let Some(n) = name
            .to_string_lossy()
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if only.is_some_and(|o| o != n) {
            continue;
        }
        total += cpu_idle_us(&cpu.path().join("cpuidle"))?;
        cpus += 1;
    }
    ensure!(cpus > 0, "no CPU {only:?} in /sys/devices/system/cpu");
    Ok((total, cpus))
}

fn cpu_idle_us(idle: &Path) -> anyhow::Result<u64> {
    let states = std::fs::read_dir(idle).with_context(|| {
        format!(
            "no cpuidle statistics in {}: CPU time cannot be measured exactly here",
            idle.display()
        )
    })?;
    let mut total = 0;
    for state in states.flatten() {
        let path = state.path().join("time");
        let t = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        total += t
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{} holds {t:?}, not microseconds", path.display()))?;
    }
    Ok(total)
}

/// Runs `work`; returns its result and the busy time meanwhile (wall time
/// less idle time) of CPU `only`, or of all CPUs, ns.
pub fn busy_during<T>(
    only: Option<usize>,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, f64)> {
    let (idle0, cpus) = idle_us(only)?;
    let t = Instant::now();
    let out = work()?;
    let wall = t.elapsed().as_nanos() as f64;
    let (idle1, _) = idle_us(only)?;
    Ok((out, wall * cpus as f64 - (idle1 - idle0) as f64 * 1e3))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn busy_time_counts_a_busy_loop() {
        let ((), busy) = busy_during(None, || {
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(300) {
                std::hint::black_box(0);
            }
            Ok(())
        })
        .unwrap();
        // At least the loop's own 300 ms (other work may add to it).
        assert!(busy >= 0.25e9, "{busy}");
    }
}
