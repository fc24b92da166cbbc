//! Pull progress: a log line every few seconds (bytes, total, rate, ETA), or a progress bar
//! when stderr is a terminal.
use std::io::IsTerminal;
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

    /// Reports until the returned task is aborted: a bar in a terminal, else log lines.
    pub fn report(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        if std::io::stderr().is_terminal() {
            return tokio::spawn(async move {
                let bar = indicatif::ProgressBar::new(me.total).with_message(me.model.clone());
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .expect("valid template"),
                );
                let _clear = ClearOnDrop(bar.clone());
                loop {
                    bar.set_position(me.done());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
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

/// Clears the bar when its task is aborted, so the summary line starts clean.
struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
