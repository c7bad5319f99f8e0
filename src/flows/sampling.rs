//! Sampling mode (spec): under a sustained high rate of logged packets the pipeline counts only
//! 1 in N of them, scaled by N and marked as sampled, and returns to counting every packet when
//! the rate falls.
//!
//! The rate is measured over one-second windows of logged packets read (before sampling, so it
//! is the offered rate). Sampling starts after [`SUSTAINED_WINDOWS`] windows in a row above the
//! threshold and stops after as many below half of it (hysteresis, so a rate near the threshold
//! does not flap). While sampling, N is the smallest power of two that brings the counted rate
//! under the threshold, at least 2 and at most [`MAX_SCALE`]. Sampling is agent side: the kernel
//! still hands every logged packet over (the netlink copy is cheap next to the aggregation and
//! the storage it saves), and no firewall rule changes under load.

use std::time::Duration;

/// Length of one rate window.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Windows in a row above the threshold to start sampling, below half of it to stop.
pub const SUSTAINED_WINDOWS: u32 = 3;
/// Largest sampling factor (1 in 1024 packets counted).
pub const MAX_SCALE: u16 = 1024;

/// A change of sampling mode, for the log and `ven status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Sampling started (or its factor changed) at `rate` packets per second.
    Sampling { scale: u16, rate: u64 },
    /// Every packet is counted again; the rate fell to `rate`.
    Exact { rate: u64 },
}

/// Decides which logged packets are counted.
#[derive(Debug)]
pub struct Sampler {
    /// Packets per second above which sampling starts (0: never).
    threshold: u64,
    window_start_ms: u64,
    window_events: u64,
    windows_over: u32,
    windows_under: u32,
    /// 1: every packet is counted.
    scale: u16,
    /// Packets skipped since the last one counted.
    skipped: u16,
}

impl Sampler {
    pub fn new(threshold: u32, now_ms: u64) -> Self {
        Self {
            threshold: u64::from(threshold),
            window_start_ms: now_ms,
            window_events: 0,
            windows_over: 0,
            windows_under: 0,
            scale: 1,
            skipped: 0,
        }
    }

    /// The current factor: 1 when every packet is counted.
    pub fn scale(&self) -> u16 {
        self.scale
    }

    /// Takes one logged packet: `Some(scale)` when it is to be counted as `scale` packets.
    pub fn admit(&mut self) -> Option<u16> {
        self.window_events += 1;
        if self.scale <= 1 {
            return Some(1);
        }
        self.skipped += 1;
        if self.skipped >= self.scale {
            self.skipped = 0;
            Some(self.scale)
        } else {
            None
        }
    }

    /// Closes every whole window that ended by `now_ms` and says whether the mode changed.
    /// Called after each batch read and on the pipeline's timer while sampling.
    pub fn tick(&mut self, now_ms: u64) -> Option<Transition> {
        let window_ms = WINDOW.as_millis() as u64;
        let elapsed = now_ms.saturating_sub(self.window_start_ms);
        if elapsed < window_ms || self.threshold == 0 {
            if self.threshold == 0 {
                self.window_events = 0;
                self.window_start_ms = now_ms;
            }
            return None;
        }
        // Windows with nothing read (the thread slept) count as idle ones.
        let rate = self.window_events.saturating_mul(1000) / elapsed.max(1);
        let idle_windows = u32::try_from(elapsed / window_ms - 1).unwrap_or(u32::MAX);
        self.window_start_ms = now_ms;
        self.window_events = 0;
        let transition = self.close_window(rate);
        if idle_windows > 0 && self.scale > 1 {
            return self.close_idle_windows(idle_windows).or(transition);
        }
        transition
    }

    /// Whether the pipeline must wake up to close windows even when no packet comes.
    pub fn needs_ticks(&self) -> bool {
        self.scale > 1 || self.windows_over > 0
    }

    fn close_window(&mut self, rate: u64) -> Option<Transition> {
        if rate > self.threshold {
            self.windows_over += 1;
            self.windows_under = 0;
        } else if rate < self.threshold / 2 {
            self.windows_under += 1;
            self.windows_over = 0;
        } else {
            self.windows_over = 0;
            self.windows_under = 0;
        }
        if self.scale > 1 && self.windows_under >= SUSTAINED_WINDOWS {
            self.scale = 1;
            self.skipped = 0;
            return Some(Transition::Exact { rate });
        }
        if self.windows_over >= SUSTAINED_WINDOWS || (self.scale > 1 && rate > self.threshold) {
            let scale = scale_for(rate, self.threshold);
            if scale != self.scale {
                self.scale = scale;
                self.skipped = 0;
                return Some(Transition::Sampling { scale, rate });
            }
        }
        None
    }

    fn close_idle_windows(&mut self, idle: u32) -> Option<Transition> {
        let mut transition = None;
        for _ in 0..idle.min(SUSTAINED_WINDOWS) {
            transition = self.close_window(0).or(transition);
        }
        transition
    }
}

/// The smallest power of two that brings `rate` under `threshold`, in 2..=[`MAX_SCALE`].
fn scale_for(rate: u64, threshold: u64) -> u16 {
    let needed = rate.div_ceil(threshold.max(1)).clamp(2, u64::from(MAX_SCALE));
    u16::try_from(needed.next_power_of_two()).unwrap_or(MAX_SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `rate` packets per second for `seconds` windows; returns the transitions and how
    /// many packets were counted (scaled) out of those offered.
    fn run(sampler: &mut Sampler, now_ms: &mut u64, rate: u64, seconds: u64) -> (Vec<Transition>, u64) {
        let mut transitions = Vec::new();
        let mut counted = 0;
        for _ in 0..seconds {
            for _ in 0..rate {
                counted += u64::from(sampler.admit().unwrap_or(0));
            }
            *now_ms += 1000;
            transitions.extend(sampler.tick(*now_ms));
        }
        (transitions, counted)
    }

    #[test]
    fn a_rate_under_the_threshold_is_counted_exactly() {
        let mut now = 0;
        let mut sampler = Sampler::new(1000, now);
        let (transitions, counted) = run(&mut sampler, &mut now, 999, 10);
        assert!(transitions.is_empty());
        assert_eq!(counted, 9990);
        assert_eq!(sampler.scale(), 1);
    }

    #[test]
    fn a_sustained_high_rate_samples_and_keeps_the_scaled_count() {
        let mut now = 0;
        let mut sampler = Sampler::new(1000, now);
        let (transitions, _) = run(&mut sampler, &mut now, 5000, SUSTAINED_WINDOWS as u64);
        assert_eq!(transitions, [Transition::Sampling { scale: 8, rate: 5000 }]);
        let (more, counted) = run(&mut sampler, &mut now, 5000, 4);
        assert!(more.is_empty(), "{more:?}");
        assert_eq!(counted, 20_000, "1 in 8 counted as 8");
    }

    #[test]
    fn a_short_burst_does_not_sample() {
        let mut now = 0;
        let mut sampler = Sampler::new(1000, now);
        let (mut transitions, _) = run(&mut sampler, &mut now, 5000, SUSTAINED_WINDOWS as u64 - 1);
        transitions.extend(run(&mut sampler, &mut now, 100, 5).0);
        assert!(transitions.is_empty(), "{transitions:?}");
    }

    #[test]
    fn sampling_stops_only_when_the_rate_falls_well_under_the_threshold() {
        let mut now = 0;
        let mut sampler = Sampler::new(1000, now);
        run(&mut sampler, &mut now, 3000, SUSTAINED_WINDOWS as u64);
        assert_eq!(sampler.scale(), 4);
        // Between half the threshold and the threshold: stays, the factor follows the rate.
        let (transitions, _) = run(&mut sampler, &mut now, 700, 5);
        assert_eq!(transitions, []);
        let (transitions, counted) = run(&mut sampler, &mut now, 400, SUSTAINED_WINDOWS as u64);
        assert_eq!(transitions, [Transition::Exact { rate: 400 }]);
        assert!(counted <= 400 * SUSTAINED_WINDOWS as u64 + 4);
        assert_eq!(sampler.scale(), 1);
    }

    #[test]
    fn an_idle_pipeline_leaves_sampling_on_its_next_tick() {
        let mut now = 0;
        let mut sampler = Sampler::new(1000, now);
        run(&mut sampler, &mut now, 9000, SUSTAINED_WINDOWS as u64);
        assert!(sampler.needs_ticks());
        now += 10_000;
        assert_eq!(sampler.tick(now), Some(Transition::Exact { rate: 0 }));
        assert!(!sampler.needs_ticks());
    }

    #[test]
    fn threshold_zero_never_samples_and_the_factor_is_capped() {
        let mut now = 0;
        let mut never = Sampler::new(0, now);
        assert!(run(&mut never, &mut now, 100_000, 5).0.is_empty());
        assert_eq!(scale_for(u64::MAX, 1), MAX_SCALE);
        assert_eq!(scale_for(1001, 1000), 2);
    }
}
