//! Request batching, DataLoader style: each caller asks for one key of a group, and the keys
//! of one group asked for at about the same time are loaded together by one call.
//!
//! The attendance lookups use it so that lookups running at the same time for one work date
//! share an `attendance/list` call (up to 50 users) instead of making one call per user. Each
//! caller still gets only its own answer and keeps its own bookkeeping.
//!
//! A batch opens with its group's first request and closes when it holds `max_keys` distinct
//! keys or when `linger` has passed since it opened, whichever comes first; the group's next
//! request opens a new batch. A closed batch is loaded in a task of its own, so a caller that
//! gives up (its handler timed out and its future was dropped) holds nobody up: it just gets
//! no answer, and a key whose callers all gave up is left out of the load. A batch that ends
//! without answering (its task panicked, or the runtime shut down) answers every caller with
//! [`BatchError::Dropped`], so nobody waits for ever on it.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

/// What a load returns: the value of each key it found. A key it did not find is answered
/// `None`.
pub type LoadFuture<K, V, E> = Pin<Box<dyn Future<Output = Result<HashMap<K, V>, E>> + Send>>;

type LoadFn<C, G, K, V, E> = dyn Fn(C, G, Vec<K>) -> LoadFuture<K, V, E> + Send + Sync;

/// Why a caller got no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError<E> {
    /// The batch's load failed; every caller in the batch gets the same error.
    #[error("{0}")]
    Load(E),
    /// The batch ended without an answer (its task panicked or was dropped).
    #[error("the batch ended without an answer")]
    Dropped,
}

/// Gathers requests into batches and loads each batch with one call of its load function.
/// Cheap to clone; clones share the open batches.
pub struct Batcher<C, G, K, V, E> {
    shared: Arc<Shared<C, G, K, V, E>>,
}

impl<C, G, K, V, E> Clone for Batcher<C, G, K, V, E> {
    fn clone(&self) -> Self {
        Batcher {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<C, G, K, V, E> {
    load: Box<LoadFn<C, G, K, V, E>>,
    linger: Duration,
    max_keys: usize,
    /// A std mutex: it is held only to add a request to a batch or to take a batch out, never
    /// across an await, so it cannot be held by a caller that was cancelled.
    open: Mutex<OpenBatches<C, G, K, V, E>>,
}

struct OpenBatches<C, G, K, V, E> {
    /// Numbers batches, so a linger timer closes the batch it was started for and not a
    /// later batch of the same group.
    next_id: u64,
    /// At most one open batch per group.
    by_group: HashMap<G, Batch<C, K, V, E>>,
}

type Reply<V, E> = oneshot::Sender<Result<Option<V>, E>>;

/// What adding a request did.
enum Added<C, K, V, E> {
    /// It joined an open batch: nothing more to do.
    Joined,
    /// It opened batch `id`, whose linger timer must now be started.
    Opened(u64),
    /// It filled its batch, which is taken out and must now be run (a batch filled by the
    /// request that opened it needs no timer).
    Filled(Batch<C, K, V, E>),
}

struct Batch<C, K, V, E> {
    id: u64,
    /// What the load runs with: the context given by the request that opened the batch.
    context: C,
    /// Distinct keys in the order they were first asked for.
    keys: Vec<K>,
    /// Everyone waiting, by key (a key asked for twice is loaded once and answered twice).
    waiting: HashMap<K, Vec<Reply<V, E>>>,
}

impl<C, G, K, V, E> Batcher<C, G, K, V, E>
where
    C: Send + 'static,
    G: Hash + Eq + Clone + Send + 'static,
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + 'static,
    E: Clone + Send + 'static,
{
    /// A batcher that closes a batch after `linger` or at `max_keys` distinct keys (at least
    /// 1), and loads it with `load(context, group, keys)`.
    pub fn new<F>(linger: Duration, max_keys: usize, load: F) -> Self
    where
        F: Fn(C, G, Vec<K>) -> LoadFuture<K, V, E> + Send + Sync + 'static,
    {
        Batcher {
            shared: Arc::new(Shared {
                load: Box::new(load),
                linger,
                max_keys: max_keys.max(1),
                open: Mutex::new(OpenBatches {
                    next_id: 0,
                    by_group: HashMap::new(),
                }),
            }),
        }
    }

    /// The value of `key` in `group`, loaded together with the other keys of the group asked
    /// for at about the same time. `context` is what the load runs with if this request opens
    /// the batch (all callers of one batcher should pass equivalent contexts). `None`: the load
    /// did not find the key.
    pub async fn load(&self, context: C, group: G, key: K) -> Result<Option<V>, BatchError<E>> {
        let (reply, answer) = oneshot::channel();
        match self.shared.add(context, &group, key, reply) {
            Added::Joined => {}
            Added::Opened(id) => {
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move {
                    tokio::time::sleep(shared.linger).await;
                    if let Some(batch) = shared.take(&group, id) {
                        shared.run(group, batch).await;
                    }
                });
            }
            Added::Filled(batch) => {
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move { shared.run(group, batch).await });
            }
        }
        match answer.await {
            Ok(result) => result.map_err(BatchError::Load),
            Err(_) => Err(BatchError::Dropped),
        }
    }
}

impl<C, G, K, V, E> Shared<C, G, K, V, E>
where
    G: Hash + Eq + Clone,
    K: Hash + Eq + Clone,
    V: Clone,
    E: Clone,
{
    fn lock(&self) -> MutexGuard<'_, OpenBatches<C, G, K, V, E>> {
        // Nothing panics while holding it; if something did, the map is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a request to its group's open batch, opening one if there is none.
    fn add(&self, context: C, group: &G, key: K, reply: Reply<V, E>) -> Added<C, K, V, E> {
        let mut open = self.lock();
        let open = &mut *open;
        let mut opened = None;
        let batch = open.by_group.entry(group.clone()).or_insert_with(|| {
            let id = open.next_id;
            opened = Some(id);
            Batch {
                id,
                context,
                keys: Vec::new(),
                waiting: HashMap::new(),
            }
        });
        if opened.is_some() {
            open.next_id = open.next_id.wrapping_add(1);
        }
        let waiting = batch.waiting.entry(key.clone()).or_default();
        if waiting.is_empty() {
            batch.keys.push(key);
        }
        waiting.push(reply);
        if batch.keys.len() >= self.max_keys {
            if let Some(full) = open.by_group.remove(group) {
                return Added::Filled(full);
            }
        }
        match opened {
            Some(id) => Added::Opened(id),
            None => Added::Joined,
        }
    }

    /// Takes the group's open batch out if it is still batch `id`.
    fn take(&self, group: &G, id: u64) -> Option<Batch<C, K, V, E>> {
        let mut open = self.lock();
        if open.by_group.get(group).is_some_and(|b| b.id == id) {
            open.by_group.remove(group)
        } else {
            None
        }
    }

    /// Loads a closed batch and answers everyone still waiting in it.
    async fn run(&self, group: G, batch: Batch<C, K, V, E>) {
        let Batch {
            context,
            mut keys,
            mut waiting,
            ..
        } = batch;
        // Callers that gave up need no answer, and their keys no place in the load.
        waiting.retain(|_, replies| {
            replies.retain(|r| !r.is_closed());
            !replies.is_empty()
        });
        keys.retain(|k| waiting.contains_key(k));
        if keys.is_empty() {
            return;
        }
        match (self.load)(context, group, keys).await {
            Ok(mut values) => {
                for (key, replies) in waiting {
                    let value = values.remove(&key);
                    for reply in replies {
                        // The caller may have given up meanwhile; that is its business.
                        let _ = reply.send(Ok(value.clone()));
                    }
                }
            }
            Err(error) => {
                for reply in waiting.into_values().flatten() {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type TestBatcher = Batcher<&'static str, &'static str, u32, u32, String>;
    /// Each load's group and keys, in order.
    type Loads = Arc<Mutex<Vec<(&'static str, Vec<u32>)>>>;

    /// Records each load's group and keys; answers `key * 10`, except keys over 1000 (not
    /// found), and fails loads whose context is "fail".
    fn recording(linger: Duration, max_keys: usize) -> (TestBatcher, Loads) {
        let loads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&loads);
        let batcher = Batcher::new(linger, max_keys, move |context, group, keys: Vec<u32>| {
            seen.lock().unwrap().push((group, keys.clone()));
            Box::pin(async move {
                if context == "fail" {
                    return Err(format!("{group} failed"));
                }
                Ok(keys
                    .into_iter()
                    .filter(|k| *k <= 1000)
                    .map(|k| (k, k * 10))
                    .collect())
            }) as LoadFuture<u32, u32, String>
        });
        (batcher, loads)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_loads_at_once_and_the_rest_after_the_linger() {
        let (batcher, loads) = recording(Duration::from_secs(60), 3);
        let started = tokio::time::Instant::now();
        let answers =
            futures_util::future::join_all((1..=5).map(|k| batcher.load("ctx", "2024-05-06", k)));
        let answers = answers.await;
        assert_eq!(
            answers,
            (1..=5).map(|k| Ok(Some(k * 10))).collect::<Vec<_>>()
        );
        let loads = loads.lock().unwrap().clone();
        assert_eq!(
            loads,
            [("2024-05-06", vec![1, 2, 3]), ("2024-05-06", vec![4, 5])]
        );
        // The partial batch waited for its linger, and no longer.
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn groups_are_loaded_apart_and_a_key_asked_twice_once() {
        let (batcher, loads) = recording(Duration::from_millis(50), 50);
        let (a, b, c, d) = tokio::join!(
            batcher.load("ctx", "monday", 1),
            batcher.load("ctx", "tuesday", 1),
            batcher.load("ctx", "monday", 1),
            batcher.load("ctx", "monday", 2000),
        );
        assert_eq!(
            (a, b, c, d),
            (Ok(Some(10)), Ok(Some(10)), Ok(Some(10)), Ok(None))
        );
        let mut loads = loads.lock().unwrap().clone();
        loads.sort();
        assert_eq!(loads, [("monday", vec![1, 2000]), ("tuesday", vec![1])]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_load_fails_every_caller_of_its_batch_only() {
        let (batcher, _) = recording(Duration::from_millis(50), 50);
        let (a, b, c) = tokio::join!(
            batcher.load("fail", "monday", 1),
            batcher.load("ctx", "monday", 2),
            batcher.load("ctx", "tuesday", 3),
        );
        assert_eq!(a, Err(BatchError::Load("monday failed".to_owned())));
        assert_eq!(b, Err(BatchError::Load("monday failed".to_owned())));
        assert_eq!(c, Ok(Some(30)));
    }

    fn explode() -> Result<HashMap<u32, u32>, String> {
        panic!("load panicked")
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_whose_load_panics_answers_dropped() {
        let batcher: Batcher<(), &str, u32, u32, String> =
            Batcher::new(Duration::from_millis(10), 50, |_, _, _| {
                Box::pin(async { explode() }) as LoadFuture<u32, u32, String>
            });
        let (a, b) = tokio::join!(batcher.load((), "g", 1), batcher.load((), "g", 2));
        assert_eq!(a, Err(BatchError::Dropped));
        assert_eq!(b, Err(BatchError::Dropped));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_is_left_out_and_wedges_nothing() {
        let (batcher, loads) = recording(Duration::from_millis(100), 50);
        // Gives up (like a handler timing out) before the batch closes.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), batcher.load("ctx", "monday", 7)).await;
        assert!(gave_up.is_err());
        let kept = batcher.load("ctx", "monday", 8).await;
        assert_eq!(kept, Ok(Some(80)));
        assert_eq!(loads.lock().unwrap().clone(), [("monday", vec![8])]);

        // A batch whose only caller gave up is not loaded at all, and the group works on.
        let alone =
            tokio::time::timeout(Duration::from_millis(10), batcher.load("ctx", "tuesday", 1))
                .await;
        assert!(alone.is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(loads.lock().unwrap().len(), 1);
        assert_eq!(batcher.load("ctx", "tuesday", 2).await, Ok(Some(20)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_load_runs_with_the_context_of_the_request_that_opened_the_batch() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let batcher: Batcher<u32, (), u32, u32, String> =
            Batcher::new(Duration::from_millis(10), 50, move |context, (), keys| {
                counted.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { Ok(keys.into_iter().map(|k| (k, context)).collect()) })
                    as LoadFuture<u32, u32, String>
            });
        let (a, b) = tokio::join!(batcher.load(1, (), 10), batcher.load(2, (), 20));
        assert_eq!((a, b), (Ok(Some(1)), Ok(Some(1))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
