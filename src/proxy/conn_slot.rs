//! `max_connections`: a count of open public connections, each holding one
//! place until it closes, mirrored in `wsbroker_connections_active`.
//!
//! A place is taken with one atomic add and given back with one atomic
//! subtract: accepting never waits for a place, it refuses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

/// The listener's connection limit.
#[derive(Clone)]
pub struct ConnLimit(Arc<Places>);

struct Places {
    taken: AtomicUsize,
    max: usize,
    gauge: Gauge,
}

impl ConnLimit {
    pub fn new(max: usize, gauge: Gauge) -> ConnLimit {
        ConnLimit(Arc::new(Places {
            taken: AtomicUsize::new(0),
            max,
            gauge,
        }))
    }

    /// A place for one more connection, or `None` at the limit.
    pub fn try_take(&self) -> Option<ConnSlot> {
        let places = &self.0;
        if places.taken.fetch_add(1, Ordering::AcqRel) >= places.max {
            places.taken.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        places.gauge.inc();
        Some(ConnSlot(self.0.clone()))
    }

    /// Places taken now.
    #[cfg(test)]
    fn taken(&self) -> usize {
        self.0.taken.load(Ordering::Acquire)
    }
}

/// One connection's place; given back when dropped.
pub struct ConnSlot(Arc<Places>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.gauge.dec();
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_refused_at_the_limit_and_come_back_when_dropped() {
        let gauge = Gauge::default();
        let limit = ConnLimit::new(2, gauge.clone());
        let a = limit.try_take().expect("first place");
        let b = limit.try_take().expect("second place");
        assert!(limit.try_take().is_none(), "a third place past max = 2");
        assert_eq!(limit.taken(), 2, "a refusal takes no place");
        assert_eq!(gauge.get(), 2);
        drop(a);
        assert_eq!(gauge.get(), 1);
        let c = limit.try_take().expect("a dropped place is free again");
        drop((b, c));
        assert_eq!(limit.taken(), 0);
        assert_eq!(gauge.get(), 0);
    }
}
