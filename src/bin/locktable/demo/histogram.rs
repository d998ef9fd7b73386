//! Request latencies: a log-linear histogram, mergeable across workers and
//! sent between processes as JSON.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Latency histogram: 8 buckets per power of two of microseconds (about 9% resolution).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct Histogram {
    buckets: Vec<u64>,
}

impl Histogram {
    const SUB: u32 = 8;
    pub(super) fn new() -> Self {
        Histogram {
            buckets: vec![0; 64 * Self::SUB as usize],
        }
    }
    fn bucket(us: u64) -> usize {
        let us = us.max(1);
        let p = 63 - us.leading_zeros();
        let frac = if p >= 3 {
            (us >> (p - 3)) & 7
        } else {
            (us << (3 - p)) & 7
        };
        (p * Self::SUB) as usize + frac as usize
    }
    fn upper(b: usize) -> u64 {
        let p = b as u32 / Self::SUB;
        let frac = (b as u64) % Self::SUB as u64;
        ((8 + frac + 1) << p) >> 3
    }
    pub(super) fn record(&mut self, d: Duration) {
        let b = Self::bucket(d.as_micros().min(u64::MAX as u128) as u64);
        if let Some(x) = self.buckets.get_mut(b) {
            *x += 1;
        }
    }
    pub(super) fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
    }
    pub(super) fn quantile(&self, q: f64) -> Duration {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros(Self::upper(b));
            }
        }
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((500.0..=560.0).contains(&p50), "{p50}");
        assert!((990.0..=1100.0).contains(&p99), "{p99}");
        assert_eq!(Histogram::new().quantile(0.5), Duration::ZERO);
    }
}
