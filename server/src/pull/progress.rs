//! Pull progress: a log line every few seconds (bytes, total, rate, ETA) and a summary.
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(5);
const MIB: f64 = 1024.0 * 1024.0;

pub struct Progress {
    model: String,
    total: u64,
    done: AtomicI64,
    started: Instant,
}

impl Progress {
    pub fn new(model: &str, total: u64) -> Arc<Self> {
        Arc::new(Self {
            model: model.to_string(),
            total,
            done: AtomicI64::new(0),
            started: Instant::now(),
        })
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes as i64, Ordering::Relaxed);
    }

    /// Bytes thrown away (a restart from scratch) no longer count as done.
    pub fn add_negative(&self, bytes: u64) {
        self.done.fetch_sub(bytes as i64, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed).max(0) as u64
    }

    fn line(&self) {
        let done = self.done() as f64;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done / secs;
        let eta = if rate > 0.0 {
            (self.total as f64 - done).max(0.0) / rate
        } else {
            f64::INFINITY
        };
        tracing::info!(
            model = %self.model,
            done_mib = format!("{:.1}", done / MIB),
            total_mib = format!("{:.1}", self.total as f64 / MIB),
            rate_mib_s = format!("{:.1}", rate / MIB),
            eta_s = format!("{eta:.0}"),
            "pulling"
        );
    }

    /// Logs every few seconds until the returned guard is dropped.
    pub fn report(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                me.line();
            }
        })
    }
}
