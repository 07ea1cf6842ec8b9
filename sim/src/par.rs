//! A small deterministic parallel map over scoped threads: the results come
//! back in input order whatever the number of threads, so the simulation's
//! output does not depend on it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The number of workers for `threads` (`0` = one per core).
pub fn workers(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// `items.iter().map(f)` on up to `threads` threads (each takes the next
/// item when it is free, so uneven items balance), results in input order.
pub fn map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let (f, next) = (&f, &next);
    let parts: Vec<Vec<(usize, R)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    let mut slots: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        slots[i] = Some(r);
    }
    slots.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn order_is_kept_for_any_thread_count() {
        let items: Vec<u64> = (0..1001).collect();
        let want: Vec<u64> = items.iter().map(|v| v * v).collect();
        for t in [1, 2, 3, 7, 2000] {
            assert_eq!(super::map(&items, t, |v| v * v), want);
        }
        assert!(super::map(&[] as &[u64], 4, |v| *v).is_empty());
    }
}
