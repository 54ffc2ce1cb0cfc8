//! Writes sent together (group commit), in one of two ways:
//!
//! - [`Batches::new`]: the first of a key's writes waits a short window, then sends every write
//!   of that key that came meanwhile in one request. For writes off a caller's critical path,
//!   such as a session's end, where each request to Redis costs more than the work it carries
//!   (see `migrations-lua/013_write_sessions.lua`).
//! - [`Batches::same_turn`]: no window; the first of a key's writes gives the other tasks of its
//!   thread one turn, then sends every write of that key that came meanwhile. For writes on a
//!   caller's path, such as a connect's open (`migrations-lua/015_open_sessions.lua`): the
//!   requests a thread handles at the same moment go as one, and none waits for an answer to
//!   another (a far Redis costs each caller one round trip, however many are on the way).
//!
//! No task of its own: the first caller of a batch sends it, and the others wait for their
//! answers. A sender dropped before it has answered (its caller gave up) drops the others'
//! answers with it, which they see as `None`, and try again.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, oneshot};

/// Batches of writes by key.
pub struct Batches<K, T, R> {
    open: Mutex<HashMap<K, Arc<Batch<T, R>>>>,
    /// How long the first write of a batch waits for others.
    window: Duration,
    /// A batch this full is sent at once.
    max: usize,
}

struct Batch<T, R> {
    items: Mutex<Vec<(T, oneshot::Sender<R>)>>,
    full: Notify,
}

impl<K: Hash + Eq + Clone, T, R> Batches<K, T, R> {
    pub fn new(window: Duration, max: usize) -> Self {
        Self { open: Mutex::default(), window, max: max.max(1) }
    }

    /// Batches that wait one turn of the thread's other tasks, not a window.
    pub fn same_turn(max: usize) -> Self {
        Self::new(Duration::ZERO, max)
    }

    /// Adds `item` to the open batch of `key`, and answers what `send` answered for it: `send`
    /// gets the batch's items in the order they came and answers one `R` for each, in the same
    /// order. `None` when the caller that sent the batch gave up before it answered.
    pub async fn submit<F: Future<Output = Vec<R>>>(
        &self,
        key: K,
        item: T,
        send: impl FnOnce(Vec<T>) -> F,
    ) -> Option<R> {
        let (answer, answered) = oneshot::channel();
        let (batch, leads) = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let batch = open.entry(key.clone()).or_insert_with(|| {
                Arc::new(Batch { items: Mutex::default(), full: Notify::new() })
            });
            let batch = batch.clone();
            let mut items = batch.items.lock().unwrap_or_else(|e| e.into_inner());
            items.push((item, answer));
            let leads = items.len() == 1;
            if items.len() >= self.max {
                // Closed to newcomers; its sender is told to go now.
                open.remove(&key);
                batch.full.notify_one();
            }
            drop(items);
            (batch, leads)
        };
        if leads {
            let mut closing = Closing { batches: self, key: Some(key), batch: &batch };
            if self.window.is_zero() {
                // The tasks that are ready, and those whose sockets are (the runtime polls its
                // I/O driver before it wakes a task that yielded), run first.
                if !closing.is_full() {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::select! {
                    () = tokio::time::sleep(self.window) => {}
                    () = batch.full.notified() => {}
                }
            }
            let (items, answers): (Vec<T>, Vec<_>) = closing.close().into_iter().unzip();
            let results = send(items).await;
            for (answer, result) in answers.into_iter().zip(results) {
                let _ = answer.send(result);
            }
        }
        answered.await.ok()
    }
}

/// Closes a batch to newcomers and takes its items: when its sender's wait is over, or when its
/// sender is dropped during the wait (the items' answers are then dropped).
struct Closing<'a, K: Hash + Eq, T, R> {
    batches: &'a Batches<K, T, R>,
    key: Option<K>,
    batch: &'a Arc<Batch<T, R>>,
}

impl<K: Hash + Eq, T, R> Closing<'_, K, T, R> {
    /// Whether the batch is closed to newcomers already, being full.
    fn is_full(&self) -> bool {
        self.batch.items.lock().unwrap_or_else(|e| e.into_inner()).len() >= self.batches.max
    }

    fn close(&mut self) -> Vec<(T, oneshot::Sender<R>)> {
        let Some(key) = self.key.take() else { return Vec::new() };
        let mut open = self.batches.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.get(&key).is_some_and(|b| Arc::ptr_eq(b, self.batch)) {
            open.remove(&key);
        }
        let mut items = self.batch.items.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *items)
    }
}

impl<K: Hash + Eq, T, R> Drop for Closing<'_, K, T, R> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const WINDOW: Duration = Duration::from_millis(5);

    /// Answers each item doubled, and counts the requests.
    async fn doubled(requests: &AtomicUsize, items: Vec<u32>) -> Vec<u32> {
        requests.fetch_add(1, Ordering::SeqCst);
        items.into_iter().map(|i| i * 2).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn writes_within_the_window_go_in_one_request_and_each_gets_its_answer() {
        let batches = Batches::new(WINDOW, 100);
        let requests = AtomicUsize::new(0);
        let send = |items| doubled(&requests, items);
        let answers =
            futures_util::future::join_all((1..=10).map(|i| batches.submit("agent", i, send)))
                .await;
        assert_eq!(answers, (1..=10).map(|i| Some(i * 2)).collect::<Vec<_>>());
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        // A write after the batch went opens another.
        assert_eq!(batches.submit("agent", 7, send).await, Some(14));
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_batched_apart_and_a_full_batch_goes_at_once() {
        let batches = Batches::new(Duration::from_secs(3600), 3);
        let requests = AtomicUsize::new(0);
        let send = |items| doubled(&requests, items);
        let started = tokio::time::Instant::now();
        let answers = futures_util::future::join_all([
            batches.submit("a", 1, send),
            batches.submit("b", 2, send),
            batches.submit("a", 3, send),
            batches.submit("a", 4, send),
        ])
        .await;
        // "a" filled up and went at once; "b" waited out its window.
        assert_eq!(answers, [Some(2), Some(4), Some(6), Some(8)]);
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(started.elapsed(), Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_that_gives_up_leaves_no_write_waiting_forever() {
        let batches = Batches::new(WINDOW, 100);
        let requests = AtomicUsize::new(0);
        let send = |items| doubled(&requests, items);
        let mut first = Box::pin(batches.submit("agent", 1, send));
        let mut second = Box::pin(batches.submit("agent", 2, send));
        async fn pending<F: Future>(mut f: std::pin::Pin<&mut F>) -> bool {
            std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_pending()))
                .await
        }
        // Both join; the first, which would send, gives up within the window.
        assert!(pending(first.as_mut()).await);
        assert!(pending(second.as_mut()).await);
        drop(first);
        assert_eq!(second.await, None, "told, not left waiting");
        assert_eq!(requests.load(Ordering::SeqCst), 0);
        // The key takes new writes.
        assert_eq!(batches.submit("agent", 3, send).await, Some(6));
    }

    #[tokio::test]
    async fn same_turn_writes_go_together_and_none_waits_for_another_answer() {
        let batches = Batches::same_turn(100);
        let sizes = Mutex::new(Vec::new());
        let (answer, answered) = tokio::sync::watch::channel(false);
        // Each request is answered when the test says so.
        let send = |items: Vec<u32>| {
            sizes.lock().unwrap().push(items.len());
            let mut answered = answered.clone();
            async move {
                answered.wait_for(|go| *go).await.unwrap();
                items.into_iter().map(|i| i * 2).collect()
            }
        };
        // Three writes in the same turn, "other" apart.
        let first = futures_util::future::join_all(
            [1, 2, 3, 4].map(|i| batches.submit(if i == 4 { "other" } else { "agent" }, i, send)),
        );
        // A write of a later turn, while the first batch waits for its answer, goes at once.
        let later = async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let later = batches.submit("agent", 5, send);
            tokio::pin!(later);
            for _ in 0..10 {
                assert!(futures_util::poll!(later.as_mut()).is_pending());
                tokio::task::yield_now().await;
            }
            assert_eq!(*sizes.lock().unwrap(), [3, 1, 1], "sent without waiting for an answer");
            answer.send(true).unwrap();
            later.await
        };
        let (first, later) = futures_util::future::join(first, later).await;
        assert_eq!(first, [Some(2), Some(4), Some(6), Some(8)]);
        assert_eq!(later, Some(10));
    }
}
