//! The autoscaler's decisions, as a pure function of the load the pods report over time.
//!
//! Load is requests in flight plus queued, summed over the ready pods. Each replica should
//! carry `target` of it. A stable window (60 s) averages it for ordinary decisions; a short
//! panic window (6 s) catches bursts: when it shows at least `panic_threshold` times what the
//! current replicas are meant to carry, the autoscaler scales up on the short window at once
//! and does not scale down until the stable window has passed without another burst. Scaling
//! down waits until every recommendation over `scale_down_delay` was lower. Until one stable
//! window of samples has been seen, only bursts move the replicas.
use std::collections::VecDeque;
use std::time::Duration;

/// What the ModelDeployment's `spec.autoscaling` asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub min: i32,
    pub max: i32,
    /// Load each replica should carry.
    pub target: f64,
    pub scale_down_delay: Duration,
}

/// How the load is averaged: operator settings, the same for every ModelDeployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Windows {
    pub stable: Duration,
    pub panic: Duration,
    /// Panic when the short window's load is this many times the current capacity.
    pub panic_threshold: f64,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            stable: Duration::from_secs(60),
            panic: Duration::from_secs(6),
            panic_threshold: 2.0,
        }
    }
}

/// One scrape round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Time since an arbitrary start, the same clock for every sample.
    pub at: Duration,
    /// Load of the pods that answered, scaled up to every ready pod.
    pub load: f64,
    pub answered: usize,
    pub ready: usize,
}

/// What the autoscaler decided, with the numbers that drove it (for status and events).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub replicas: i32,
    /// Average load over the stable and the panic window.
    pub stable_load: f64,
    pub panic_load: f64,
    pub panicking: bool,
    pub answered: usize,
    pub ready: usize,
}

/// The history one ModelDeployment's decisions depend on.
#[derive(Debug, Clone)]
pub struct State {
    samples: VecDeque<(Duration, f64)>,
    /// Recommendations over the scale-down delay, oldest first.
    recommendations: VecDeque<(Duration, i32)>,
    /// When the last burst was seen.
    panic_at: Option<Duration>,
    /// When sampling began: until the stable window is full its average is too noisy to
    /// act on, and only bursts count.
    since: Option<Duration>,
    replicas: i32,
}

impl State {
    /// Starts from the replicas in place at `now`; they count as recommended then, so a
    /// restarted operator waits a full delay before scaling anything down.
    pub fn new(replicas: i32, now: Duration) -> Self {
        Self {
            samples: VecDeque::new(),
            recommendations: VecDeque::from([(now, replicas)]),
            panic_at: None,
            since: None,
            replicas,
        }
    }

    pub fn replicas(&self) -> i32 {
        self.replicas
    }

    /// Takes one scrape round into account and returns the decision.
    pub fn observe(&mut self, bounds: &Bounds, windows: &Windows, sample: Sample) -> Decision {
        let now = sample.at;
        let since = *self.since.get_or_insert(now);
        self.samples.push_back((now, sample.load));
        trim(&mut self.samples, now, windows.stable);
        let stable_load = mean(self.samples.iter(), now, windows.stable);
        let panic_load = mean(self.samples.iter(), now, windows.panic);
        let per_replica = |load: f64| (load / bounds.target).ceil() as i32;

        let capacity = f64::from(self.replicas.max(1)) * bounds.target;
        if panic_load >= windows.panic_threshold * capacity {
            self.panic_at = Some(now);
        }
        let panicking = self
            .panic_at
            .is_some_and(|at| now.saturating_sub(at) < windows.stable);
        if !panicking {
            self.panic_at = None;
        }
        let warm = now.saturating_sub(since) >= windows.stable;
        let mut recommended = if panicking {
            per_replica(panic_load)
                .max(per_replica(stable_load))
                .max(self.replicas)
        } else if warm {
            per_replica(stable_load)
        } else {
            self.replicas
        };
        // Requests are arriving: at least one pod must serve them.
        if sample.load > 0.0 {
            recommended = recommended.max(1);
        }
        let recommended = recommended.clamp(bounds.min, bounds.max);

        self.recommendations.push_back((now, recommended));
        trim(&mut self.recommendations, now, bounds.scale_down_delay);
        let highest = self.recommendations.iter().map(|(_, r)| *r).max();
        let span_covered = self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) >= bounds.scale_down_delay);
        self.replicas = match highest {
            Some(h) if h > self.replicas => h,
            Some(h) if h < self.replicas && span_covered && !panicking => h,
            _ => self.replicas,
        }
        .clamp(bounds.min, bounds.max);
        Decision {
            replicas: self.replicas,
            stable_load,
            panic_load,
            panicking,
            answered: sample.answered,
            ready: sample.ready,
        }
    }
}

/// Drops entries older than `window`, keeping the newest one before it so that the
/// window's start is still covered.
fn trim<T>(entries: &mut VecDeque<(Duration, T)>, now: Duration, window: Duration) {
    while entries.len() > 1 && now.saturating_sub(entries[1].0) >= window {
        entries.pop_front();
    }
}

/// Mean of the values seen within `window` before `now`.
fn mean<'a>(
    entries: impl Iterator<Item = &'a (Duration, f64)>,
    now: Duration,
    window: Duration,
) -> f64 {
    let (sum, n) = entries
        .filter(|(at, _)| now.saturating_sub(*at) < window)
        .fold((0.0, 0u32), |(s, n), (_, v)| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}

/// The load of one scrape round: the pods that answered stand for those that did not, and
/// requests `held` in gateways for want of a ready pod are added. `None` when no ready pod
/// answered and none are held (nothing to decide on).
pub fn estimate(answers: &[Option<f64>], held: f64, at: Duration) -> Option<Sample> {
    let answered: Vec<f64> = answers.iter().flatten().copied().collect();
    let held = held.max(0.0);
    let pods = if answered.is_empty() {
        if held == 0.0 {
            return None;
        }
        0.0
    } else {
        answered.iter().sum::<f64>() / answered.len() as f64 * answers.len() as f64
    };
    Some(Sample {
        at,
        load: pods + held,
        answered: answered.len(),
        ready: answers.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_secs(2);

    fn bounds(min: i32, max: i32) -> Bounds {
        Bounds {
            min,
            max,
            target: 8.0,
            scale_down_delay: Duration::from_secs(300),
        }
    }

    /// Replicas after each 2 s tick while `load(t)` (seconds) is offered, starting at `start`.
    fn run(bounds: Bounds, start: i32, seconds: u64, load: impl Fn(f64) -> f64) -> Vec<i32> {
        let windows = Windows::default();
        let mut state = State::new(start, Duration::ZERO);
        (1..=seconds / 2)
            .map(|i| {
                let at = TICK * i as u32;
                let sample = Sample {
                    at,
                    load: load(at.as_secs_f64()),
                    answered: 1,
                    ready: 1,
                };
                state.observe(&bounds, &windows, sample).replicas
            })
            .collect()
    }

    fn changes(replicas: &[i32]) -> usize {
        replicas.windows(2).filter(|w| w[0] != w[1]).count()
    }

    /// Index of the first tick at which `replicas` reaches `n`.
    fn first(replicas: &[i32], n: i32) -> Option<usize> {
        replicas.iter().position(|r| *r == n)
    }

    #[test]
    fn a_load_step_is_followed_within_the_stable_window() {
        // 8 in flight, then 24 from t = 100 s: 1 replica, then 3.
        let r = run(
            bounds(1, 10),
            1,
            400,
            |t| if t < 100.0 { 8.0 } else { 24.0 },
        );
        assert_eq!(r[40], 1);
        let at = first(&r, 3).expect("reaches 3") * 2 + 2;
        assert!((100..=160).contains(&at), "3 replicas at {at} s");
        assert_eq!(*r.last().unwrap(), 3);
        assert!(
            r.iter().all(|n| *n <= 3),
            "never above what the load needs: {r:?}"
        );
    }

    #[test]
    fn a_burst_panics_and_scales_up_in_seconds() {
        // 8 in flight, then 80 from t = 100 s: panic mode gets there well before 60 s.
        let r = run(
            bounds(1, 10),
            1,
            200,
            |t| if t < 100.0 { 8.0 } else { 80.0 },
        );
        let at = first(&r, 10).expect("reaches 10") * 2 + 2;
        assert!((100..=110).contains(&at), "10 replicas at {at} s");
    }

    #[test]
    fn lower_demand_scales_down_only_after_the_delay() {
        // 40 in flight (5 replicas) until 200 s, then 8: down to 1, no sooner than 300 s
        // after the stable average fell.
        let r = run(
            bounds(1, 10),
            5,
            900,
            |t| if t < 200.0 { 40.0 } else { 8.0 },
        );
        assert_eq!(r[99], 5, "still 5 at 200 s");
        let down = r.iter().position(|n| *n < 5).expect("scales down") * 2 + 2;
        assert!(
            down >= 500,
            "scaled down at {down} s, before the 300 s delay"
        );
        assert_eq!(*r.last().unwrap(), 1);
    }

    #[test]
    fn a_slow_decay_steps_down_without_going_below_need() {
        // Load decays from 64 to 8 over ten minutes.
        let load = |t: f64| (64.0 - t / 600.0 * 56.0).max(8.0);
        let r = run(bounds(1, 10), 8, 1500, load);
        for (i, n) in r.iter().enumerate() {
            let t = (i as f64 + 1.0) * 2.0;
            let need = (load(t) / 8.0).ceil() as i32;
            assert!(
                *n >= need,
                "{n} replicas at {t} s for a load needing {need}"
            );
        }
        assert_eq!(*r.last().unwrap(), 1);
        let decreasing = r.windows(2).all(|w| w[1] <= w[0]);
        assert!(decreasing, "only ever scales down: {r:?}");
    }

    #[test]
    fn a_noisy_flat_load_changes_nothing() {
        // 20 ± 6 in flight, pseudo-random: 3 replicas throughout.
        let mut x: u64 = 12345;
        let noise: Vec<f64> = (0..2000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % 13) as f64 - 6.0
            })
            .collect();
        let r = run(bounds(1, 10), 3, 3600, |t| 20.0 + noise[(t / 2.0) as usize]);
        assert_eq!(changes(&r), 0, "{r:?}");
    }

    #[test]
    fn decisions_stay_within_min_and_max() {
        let r = run(
            bounds(2, 4),
            2,
            600,
            |t| if t < 300.0 { 0.0 } else { 500.0 },
        );
        assert!(r.iter().all(|n| (2..=4).contains(n)), "{r:?}");
        assert_eq!(*r.last().unwrap(), 4);
    }

    #[test]
    fn idle_scales_to_zero_after_the_delay_when_allowed() {
        let r = run(bounds(0, 4), 2, 800, |t| if t < 100.0 { 8.0 } else { 0.0 });
        let zero = first(&r, 0).expect("reaches zero") * 2 + 2;
        assert!((400..=480).contains(&zero), "zero at {zero} s");
        let with_min = run(bounds(1, 4), 2, 800, |t| if t < 100.0 { 8.0 } else { 0.0 });
        assert_eq!(*with_min.last().unwrap(), 1);
    }

    #[test]
    fn a_restarted_autoscaler_waits_before_scaling_down() {
        let r = run(bounds(1, 10), 6, 400, |_| 8.0);
        assert_eq!(r[..140].iter().filter(|n| **n == 6).count(), 140, "{r:?}");
        assert_eq!(*r.last().unwrap(), 1);
    }

    #[test]
    fn pods_that_do_not_answer_are_estimated_from_those_that_do() {
        let s = estimate(&[Some(10.0), None, Some(6.0)], 0.0, TICK).unwrap();
        assert_eq!((s.load, s.answered, s.ready), (24.0, 2, 3));
        assert_eq!(estimate(&[None, None], 0.0, TICK), None);
        assert_eq!(estimate(&[], 0.0, TICK), None);
    }

    #[test]
    fn requests_held_in_a_gateway_wake_a_model_scaled_to_zero() {
        let sample = estimate(&[], 1.0, TICK).unwrap();
        assert_eq!((sample.load, sample.answered, sample.ready), (1.0, 0, 0));
        let mut state = State::new(0, Duration::ZERO);
        let decision = state.observe(&bounds(0, 4), &Windows::default(), sample);
        assert_eq!(
            decision.replicas, 1,
            "one held request starts a pod at once"
        );
        // Held requests add to what the pods report.
        let s = estimate(&[Some(4.0)], 3.0, TICK).unwrap();
        assert_eq!(s.load, 7.0);
    }
}
