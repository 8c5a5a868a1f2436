//! The node's threads: one tokio worker per CPU the process may run on
//! (`TOKIO_WORKER_THREADS` sets another count), left to the kernel to
//! place unless `WSBROKER_PIN_WORKERS=1` pins each worker to a CPU of the
//! process's CPU set, in turn (like nginx's `worker_cpu_affinity`).
//!
//! Pinning is off by default. Measured on two shared cores (BENCHMARKS.md):
//! pinned workers relay messages with less CPU (they stop parking and
//! waking each other: 0.12–0.25 context switches per echoed message instead
//! of up to 1.1), but new sessions cost more, and when something else
//! holds a worker's CPU the worker cannot move (on a busy host pinning
//! lost 17 % of the round-trip rate). It suits a host whose CPUs are
//! given to the proxy.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Set to `1` to pin the workers to CPUs.
pub const PIN_VARIABLE: &str = "WSBROKER_PIN_WORKERS";

/// Builds the node's multi-threaded runtime.
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let setting = std::env::var(PIN_VARIABLE).ok();
    if setting.is_some() {
        let workers = worker_count()?;
        if let Some(cpus) = pin_plan(workers, &allowed_cpus(), setting.as_deref()) {
            // Only worker threads park (the blocking pool's threads never
            // do): each worker pins itself the first time it parks.
            let next = Arc::new(AtomicUsize::new(0));
            builder.on_thread_park(move || {
                PINNED.with(|pinned| {
                    if !pinned.replace(true) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if let Some(&cpu) = cpus.get(n) {
                            pin_current_thread(cpu);
                        }
                    }
                })
            });
        }
    }
    builder.build()
}

thread_local! {
    /// This worker has taken its CPU (or found none left).
    static PINNED: Cell<bool> = const { Cell::new(false) };
}

/// Workers: `TOKIO_WORKER_THREADS` when set, else the CPUs available to
/// the process (its CPU set and quota), as tokio itself chooses.
fn worker_count() -> std::io::Result<usize> {
    match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("TOKIO_WORKER_THREADS must be a positive number, not {v:?}"),
                )
            }),
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// The CPU each worker is pinned to, in start order, or None to leave the
/// workers to the kernel. `allowed`: the CPUs the process may run on;
/// `setting`: the value of [`PIN_VARIABLE`], if set.
pub fn pin_plan(workers: usize, allowed: &[usize], setting: Option<&str>) -> Option<Vec<usize>> {
    if allowed.is_empty() || workers == 0 || setting.map(str::trim) != Some("1") {
        return None;
    }
    Some((0..workers).map(|i| allowed[i % allowed.len()]).collect())
}

/// The CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is valid;
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into
    // it, and CPU_ISSET only reads it, at indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Restricts the calling thread to `cpu`; a failure leaves it unpinned.
fn pin_current_thread(cpu: usize) {
    // SAFETY: as above; CPU_SET writes one bit below CPU_SETSIZE (checked),
    // and sched_setaffinity(0, ..) only reads the set for this thread.
    let ok = cpu < libc::CPU_SETSIZE as usize
        && unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        };
    if !ok {
        tracing::debug!(cpu, "could not pin a worker thread; it stays unpinned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_left_to_the_kernel_unless_asked() {
        assert_eq!(pin_plan(2, &[0, 1], None), None);
        assert_eq!(pin_plan(2, &[0, 1], Some("0")), None);
        assert_eq!(pin_plan(2, &[0, 1], Some("yes")), None);
    }

    #[test]
    fn pinned_workers_take_the_allowed_cpus_in_turn() {
        assert_eq!(pin_plan(2, &[0, 1], Some("1")), Some(vec![0, 1]));
        assert_eq!(pin_plan(2, &[4, 6], Some(" 1 ")), Some(vec![4, 6]));
        assert_eq!(pin_plan(4, &[0, 1], Some("1")), Some(vec![0, 1, 0, 1]));
        assert_eq!(pin_plan(2, &[0, 1, 2, 3], Some("1")), Some(vec![0, 1]));
        assert_eq!(pin_plan(2, &[], Some("1")), None);
    }
}
