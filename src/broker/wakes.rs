//! Which of a task's sources woke it, so that a wake-up polls that source alone.
//!
//! A session waits on four things at once: its kick, its link (a mailbox or the router), its
//! socket and a timer. Polled together at each wake-up, as `select!` does, every source that did
//! not fire is registered again for nothing: the socket's registration alone takes a lock. Here
//! each source is polled with a waker of its own, which marks the source before it wakes the
//! task. The task then polls only the sources marked, or left ready, since it last looked; the
//! others keep the registration they have.
//!
//! A source polled elsewhere with another waker (the kick while a write waits) no longer marks
//! itself when it fires: the task marks it by hand ([`Sources::mark`]) so that it is polled, and
//! registered with its own waker, at the next look.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// What the sources' wakers share: the task to wake and the marks they leave.
#[derive(Debug, Default)]
struct Shared {
    task: AtomicWaker,
    marked: AtomicU8,
}

/// The waker of one source.
struct Source {
    shared: Arc<Shared>,
    bit: u8,
}

impl Wake for Source {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.marked.fetch_or(self.bit, Ordering::AcqRel);
        self.shared.task.wake();
    }
}

/// Up to eight sources of one task, numbered from 0 in the order the task polls them.
pub struct Sources<const N: usize> {
    shared: Arc<Shared>,
    wakers: [Waker; N],
    /// Sources to poll at the next look: marked by their wakers, ready when last polled (a
    /// source that returns `Ready` has registered nothing), or marked by hand.
    due: u8,
}

impl<const N: usize> Default for Sources<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Sources<N> {
    /// Every source due: none is registered yet.
    pub fn new() -> Sources<N> {
        const { assert!(N <= 8, "a source is one bit of a u8") };
        let shared = Arc::new(Shared::default());
        let wakers =
            std::array::from_fn(|i| Waker::from(Arc::new(Source { shared: Arc::clone(&shared), bit: 1 << i })));
        Sources { shared, wakers, due: u8::MAX }
    }

    /// Begins a look: registers the task's waker, then takes the marks the sources left. Call it
    /// at each poll of the task's wait, before [`Sources::poll`].
    pub fn begin(&mut self, cx: &Context<'_>) {
        self.shared.task.register(cx.waker());
        self.due |= self.shared.marked.swap(0, Ordering::AcqRel);
    }

    /// Polls source `i` with its own waker if it is due; `Pending` if it is not. A source that
    /// stays pending is not polled again until its waker marks it.
    pub fn poll<T>(&mut self, i: usize, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        let bit = 1 << i;
        if self.due & bit == 0 {
            return Poll::Pending;
        }
        let ready = poll(&mut Context::from_waker(&self.wakers[i]));
        if ready.is_pending() {
            self.due &= !bit;
        }
        ready
    }

    /// Has source `i` polled at the next look: it may be registered with another waker, or not at all.
    pub fn mark(&mut self, i: usize) {
        self.due |= 1 << i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A task waker that counts its wake-ups.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A counting task's waker, and its count.
    fn counted() -> (Waker, Arc<Count>) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (Waker::from(Arc::clone(&count)), count)
    }

    #[test]
    fn only_the_sources_that_woke_the_task_are_polled_again() {
        let (task, count) = counted();
        let cx = Context::from_waker(&task);
        let mut sources = Sources::<3>::new();
        let mut kept: [Option<Waker>; 3] = Default::default();
        let mut polled = Vec::new();
        let look = |sources: &mut Sources<3>, kept: &mut [Option<Waker>; 3], polled: &mut Vec<usize>| {
            sources.begin(&cx);
            for (i, slot) in kept.iter_mut().enumerate() {
                let _ = sources.poll(i, |cx| {
                    polled.push(i);
                    *slot = Some(cx.waker().clone());
                    Poll::<()>::Pending
                });
            }
        };
        // The first look polls every source; the next, none.
        look(&mut sources, &mut kept, &mut polled);
        assert_eq!(polled, [0, 1, 2]);
        polled.clear();
        look(&mut sources, &mut kept, &mut polled);
        assert!(polled.is_empty());
        // Source 1 fires: the task is woken, and polls source 1 alone.
        kept[1].take().unwrap().wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        look(&mut sources, &mut kept, &mut polled);
        assert_eq!(polled, [1]);
        polled.clear();
        // A source marked by hand is polled; a ready one is polled until it is pending.
        sources.mark(2);
        look(&mut sources, &mut kept, &mut polled);
        assert_eq!(polled, [2]);
        sources.begin(&cx);
        assert_eq!(sources.poll(0, |_| Poll::Pending::<()>), Poll::Pending, "not due: not polled");
        sources.mark(0);
        assert_eq!(sources.poll(0, |_| Poll::Ready(7)), Poll::Ready(7));
        assert_eq!(sources.poll(0, |_| Poll::Ready(8)), Poll::Ready(8), "ready: still due");
    }

    #[test]
    fn a_source_that_fires_while_the_task_runs_is_seen_at_the_next_look() {
        let (task, count) = counted();
        let cx = Context::from_waker(&task);
        let mut sources = Sources::<2>::new();
        sources.begin(&cx);
        // Source 0 fires from inside its own poll, after registering: it stays due.
        let _ = sources.poll(0, |cx| {
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        });
        let _ = sources.poll(1, |_| Poll::<()>::Pending);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        sources.begin(&cx);
        let mut polled = false;
        let _ = sources.poll(0, |_| {
            polled = true;
            Poll::<()>::Pending
        });
        assert!(polled);
        // From another thread.
        let mut kept = None;
        let _ = sources.poll(0, |_| Poll::<()>::Pending);
        sources.mark(1);
        let _ = sources.poll(1, |cx| {
            kept = Some(cx.waker().clone());
            Poll::<()>::Pending
        });
        std::thread::spawn(move || kept.unwrap().wake()).join().unwrap();
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        sources.begin(&cx);
        assert_eq!(sources.poll(1, |_| Poll::Ready(())), Poll::Ready(()));
    }
}
