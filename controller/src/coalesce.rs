//! Coalescing of reconcile requests: each object is asked for at most once per
//! window, `delay` after its first request in the window. Unlike a debounce, a
//! steady stream of requests never postpones an object forever.

use std::collections::HashSet;
use std::hash::Hash;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_util::time::DelayQueue;

/// The requests of `requests`, each object emitted `delay` after the first request
/// that is not yet emitted; later requests for it meanwhile are merged into that one.
pub fn coalesce<T>(
    requests: impl Stream<Item = T> + Unpin + Send + 'static,
    delay: Duration,
) -> impl Stream<Item = T> + Send
where
    T: Clone + Eq + Hash + Send + 'static,
{
    struct State<T, S> {
        requests: Option<S>,
        queue: DelayQueue<T>,
        waiting: HashSet<T>,
    }
    let state = State { requests: Some(requests), queue: DelayQueue::new(), waiting: HashSet::new() };
    futures::stream::unfold(state, move |mut s| async move {
        loop {
            let next = tokio::select! {
                expired = futures::future::poll_fn(|cx| s.queue.poll_expired(cx)), if !s.queue.is_empty() => {
                    expired.map(|e| e.into_inner())
                }
                request = async { s.requests.as_mut()?.next().await }, if s.requests.is_some() => {
                    match request {
                        Some(r) => {
                            if s.waiting.insert(r.clone()) {
                                s.queue.insert(r, delay);
                            }
                        }
                        None => s.requests = None,
                    }
                    continue;
                }
                else => return None,
            };
            if let Some(item) = next {
                s.waiting.remove(&item);
                return Some((item, s));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc::unbounded;

    #[tokio::test(start_paused = true)]
    async fn requests_merge_within_the_window_and_are_never_postponed() {
        let (tx, rx) = unbounded();
        let out = coalesce(rx, Duration::from_secs(1));
        futures::pin_mut!(out);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            tx.unbounded_send("a").unwrap();
        }
        tx.unbounded_send("b").unwrap();
        let first = out.next().await.unwrap();
        let second = out.next().await.unwrap();
        assert_eq!([first, second], ["a", "b"], "five requests for a are one");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // Requests every 70 ms from t = 1 s to 2.68 s: a steady stream still gets one
        // emission a window after the first request not yet emitted (2 s, then 2.05 s + 1 s).
        let feeder = tokio::spawn(async move {
            for _ in 0..25 {
                tx.unbounded_send("a").unwrap();
                tokio::time::sleep(Duration::from_millis(70)).await;
            }
        });
        let mut at = Vec::new();
        while let Some(item) = out.next().await {
            assert_eq!(item, "a");
            at.push(start.elapsed());
        }
        assert_eq!(at, [Duration::from_secs(2), Duration::from_millis(3050)], "then it ends with its requests");
        feeder.await.unwrap();
    }
}
