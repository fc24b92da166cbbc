//! Admission control: a bounded number of requests run, a bounded number wait, and the
//! rest are refused with 429 at once, before any tokenizing.
use crate::error::ApiError;
use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    slots: Arc<Semaphore>,
    running: Arc<Semaphore>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

/// Held for the life of a request (a stream's too); releases its slot when dropped.
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    _running: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.metrics.requests_in_flight.dec();
    }
}

/// Counts a request as queued for as long as it waits, even if its client leaves.
struct Queued<'a>(&'a Metrics);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.requests_queued.dec();
    }
}

impl Admission {
    pub fn new(max_concurrent: usize, max_queue: usize, metrics: Arc<Metrics>) -> Self {
        let max_concurrent = max_concurrent.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent + max_queue)),
            running: Arc::new(Semaphore::new(max_concurrent)),
            capacity: max_concurrent + max_queue,
            metrics,
        }
    }

    pub async fn admit(&self) -> Result<Permit, ApiError> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)?;
        self.metrics.requests_queued.inc();
        let queued = Queued(&self.metrics);
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        drop(queued);
        self.metrics.requests_in_flight.inc();
        Ok(Permit {
            _slot: slot,
            _running: running,
            metrics: self.metrics.clone(),
        })
    }

    /// Requests holding a slot, running or waiting: what a drain waits for.
    pub fn holding(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_past_running_plus_queue_and_counts_both() {
        let metrics = Arc::new(Metrics::new());
        let admission = Arc::new(Admission::new(1, 1, metrics.clone()));
        let first = admission.admit().await.unwrap();
        let waiting = tokio::spawn({
            let a = admission.clone();
            async move { a.admit().await.map(|_| ()) }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while metrics.requests_queued.get() == 0 {
            assert!(std::time::Instant::now() < deadline, "never queued");
            tokio::task::yield_now().await;
        }
        assert_eq!(admission.holding(), 2);
        assert_eq!(metrics.requests_in_flight.get(), 1);
        assert_eq!(metrics.requests_queued.get(), 1);
        let refused = admission.admit().await.err().unwrap();
        assert_eq!(refused.status().as_u16(), 429);
        drop(first);
        waiting.await.unwrap().unwrap();
        assert_eq!(
            (
                metrics.requests_in_flight.get(),
                metrics.requests_queued.get()
            ),
            (0, 0)
        );
        assert_eq!(admission.holding(), 0);
    }
}
