//! A connection and the work beside it, polled as one future that settles before it
//! sleeps. The two hand each other work all the time (a request goes onward, its answer
//! comes back), and each handover wakes the task. Through tokio that wake, made while the
//! task is running, reschedules it as a yield, which also wakes an idle worker thread to
//! steal it: a futex call per handover, on the request's path. Here a wake during the poll
//! only marks the task to be polled again at once, in the same call.
use futures::task::AtomicWaker;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

/// Passes through the poll loop before handing the thread back (other tasks wait).
const ROUNDS: usize = 16;

pub(crate) struct Beside<C, D> {
    connection: Pin<Box<C>>,
    beside: Pin<Box<D>>,
    wakes: Arc<Wakes>,
    waker: Waker,
}

#[derive(Default)]
struct Wakes {
    /// A wake arrived since the last pass began.
    woken: AtomicBool,
    /// Inside `poll`: a wake only needs to mark `woken`.
    polling: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl<C, D> Beside<C, D> {
    pub(crate) fn new(connection: C, beside: D) -> Self {
        let wakes = Arc::new(Wakes::default());
        Self {
            connection: Box::pin(connection),
            beside: Box::pin(beside),
            waker: Waker::from(wakes.clone()),
            wakes,
        }
    }
}

/// The work beside never ends on its own: it ends when the connection does.
impl<C: Future, D: Future<Output = Infallible>> Future for Beside<C, D> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        this.wakes.task.register(cx.waker());
        this.wakes.polling.store(true, Ordering::SeqCst);
        let mut inner = Context::from_waker(&this.waker);
        for _ in 0..ROUNDS {
            this.wakes.woken.store(false, Ordering::SeqCst);
            // The work beside first: what it has heard (a connection onward that closed,
            // say) is then known before the connection's next request is served.
            let Poll::Pending = this.beside.as_mut().poll(&mut inner);
            if let Poll::Ready(done) = this.connection.as_mut().poll(&mut inner) {
                return Poll::Ready(done);
            }
            if !this.wakes.woken.load(Ordering::SeqCst) {
                break;
            }
        }
        this.wakes.polling.store(false, Ordering::SeqCst);
        // A wake that came after the last pass looked, or the rounds ran out.
        if this.wakes.woken.load(Ordering::SeqCst) {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::oneshot;

    /// Counts the task's wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll<F: Future + Unpin>(future: &mut F, wakes: &Arc<Count>) -> Poll<F::Output> {
        let waker = Waker::from(wakes.clone());
        Pin::new(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn handovers_between_the_two_settle_within_one_poll_without_waking_the_task() {
        let (to_beside, from_connection) = oneshot::channel();
        let (to_connection, from_beside) = oneshot::channel();
        // The connection hands work over and waits for the answer; the work beside answers.
        let connection = async move {
            to_beside.send(2).unwrap();
            from_beside.await.unwrap()
        };
        let beside = async move {
            let asked: u32 = from_connection.await.unwrap();
            to_connection.send(asked * 21).unwrap();
            std::future::pending().await
        };
        let wakes = Arc::new(Count::default());
        let mut both = Beside::new(connection, beside);
        assert_eq!(poll(&mut both, &wakes), Poll::Ready(42));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_wake_from_elsewhere_between_polls_wakes_the_task() {
        let (tell, told) = oneshot::channel();
        let wakes = Arc::new(Count::default());
        let mut both = Beside::new(async move { told.await.unwrap() }, std::future::pending());
        assert_eq!(poll(&mut both, &wakes), Poll::Pending);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        tell.send("ready").unwrap();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll(&mut both, &wakes), Poll::Ready("ready"));
    }
}
