//! A semaphore that hands freed permits to projects in turn, and within a project to its jobs in turn, so a job that arrives late is not served after every item of an earlier one, nor a project with one job after every job of another.
//!
//! A worker starts every item of the chunks it holds at once, and the items
//! wait for one of its `SLUICE_CONCURRENCY` call permits. With tokio's FIFO
//! semaphore a chunk of a new job waited behind every item of the chunks
//! already held; here each job has its own queue (first come, first served
//! within it), a project's jobs take turns, and projects take turns: a
//! project running five jobs gets the same share as one running one.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::oneshot;
use uuid::Uuid;

#[derive(Debug)]
pub struct FairSemaphore {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    free: usize,
    /// Projects with waiters, in the order they are served next; in each,
    /// its jobs with waiters in the order they are served next.
    queues: VecDeque<(String, JobQueues)>,
}

/// A project's jobs with waiters, each with its waiters in arrival order.
type JobQueues = VecDeque<(Uuid, VecDeque<oneshot::Sender<()>>)>;

/// A permit; it goes back (to the next job in turn) when dropped.
#[derive(Debug)]
pub struct FairPermit<'a> {
    sem: &'a FairSemaphore,
}

impl Drop for FairPermit<'_> {
    fn drop(&mut self) {
        self.sem.release();
    }
}

/// A waiter that may be cancelled: a permit handed to it after it stopped
/// waiting is given back.
struct Waiting<'a> {
    sem: &'a FairSemaphore,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.sem.release();
            }
        }
    }
}

impl FairSemaphore {
    pub fn new(permits: usize) -> Self {
        FairSemaphore { state: Mutex::new(State { free: permits, queues: VecDeque::new() }) }
    }

    /// Waits for a permit on behalf of `job` of `project`.
    pub async fn acquire(&self, project: &str, job: Uuid) -> FairPermit<'_> {
        let rx = {
            let mut s = self.state.lock().expect("fair semaphore lock");
            if s.free > 0 && s.queues.is_empty() {
                s.free -= 1;
                return FairPermit { sem: self };
            }
            let (tx, rx) = oneshot::channel();
            let jobs = match s.queues.iter_mut().position(|(p, _)| p == project) {
                Some(i) => &mut s.queues[i].1,
                None => {
                    s.queues.push_back((project.to_string(), VecDeque::new()));
                    &mut s.queues.back_mut().expect("just pushed").1
                }
            };
            match jobs.iter_mut().find(|(k, _)| *k == job) {
                Some((_, q)) => q.push_back(tx),
                None => jobs.push_back((job, VecDeque::from([tx]))),
            }
            rx
        };
        let mut waiting = Waiting { sem: self, rx: Some(rx) };
        let granted = waiting.rx.as_mut().expect("set above").await;
        waiting.rx = None;
        granted.expect("a waiter's sender is only dropped after sending or when it is cancelled");
        FairPermit { sem: self }
    }

    /// Gives a permit to the first live waiter of the next job in turn of
    /// the next project in turn, or back to the pool.
    fn release(&self) {
        let mut s = self.state.lock().expect("fair semaphore lock");
        while let Some((project, mut jobs)) = s.queues.pop_front() {
            while let Some((job, mut q)) = jobs.pop_front() {
                while let Some(tx) = q.pop_front() {
                    if tx.send(()).is_ok() {
                        if !q.is_empty() {
                            jobs.push_back((job, q));
                        }
                        if !jobs.is_empty() {
                            s.queues.push_back((project, jobs));
                        }
                        return;
                    }
                }
            }
        }
        s.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn job(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[tokio::test]
    async fn freed_permits_go_to_jobs_in_turn() {
        let sem = Arc::new(FairSemaphore::new(1));
        let held = sem.acquire("p", job(1)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Job 1 queues six items, then job 2 queues two.
        for (j, i) in [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 0), (2, 1)] {
            let (sem, order) = (sem.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire("p", job(j)).await;
                order.lock().unwrap().push((j, i));
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, vec![(1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (1, 3), (1, 4), (1, 5)]);
    }

    #[tokio::test]
    async fn projects_take_turns_whatever_their_number_of_jobs() {
        let sem = Arc::new(FairSemaphore::new(1));
        let held = sem.acquire("a", job(1)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Project a queues two items for each of three jobs, then project b two for one job.
        for (p, j) in [("a", 1), ("a", 2), ("a", 3), ("a", 1), ("a", 2), ("a", 3), ("b", 9), ("b", 9)] {
            let (sem, order) = (sem.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire(p, job(j)).await;
                order.lock().unwrap().push((p, j));
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, vec![("a", 1), ("b", 9), ("a", 2), ("b", 9), ("a", 3), ("a", 1), ("a", 2), ("a", 3)]);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_lose_a_permit() {
        let sem = FairSemaphore::new(1);
        let held = sem.acquire("p", job(1)).await;
        {
            let waiting = sem.acquire("q", job(2));
            tokio::pin!(waiting);
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            drop(held); // the permit goes to the waiter, which is then dropped
        }
        let again = tokio::time::timeout(std::time::Duration::from_secs(1), sem.acquire("p", job(3))).await;
        assert!(again.is_ok(), "the permit came back");
    }
}
