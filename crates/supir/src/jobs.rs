//! Jobs: a bounded FIFO queue run by one worker, job states, progress events broadcast to
//! subscribers (with a replayable history) and cooperative cancellation.
//!
//! Front ends (the CLI's progress bars, `supir serve`) share these types: a pipeline reports
//! [`Progress`] through a [`ProgressMeter`] and checks a [`CancelToken`] between steps or
//! tiles; a [`JobQueue`] holds the jobs, their states and their event history. Everything is
//! synchronous (std only): the worker is a plain thread blocked in [`JobQueue::next`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Error, Result};

/// Most events kept per job for replay; older progress events are dropped first.
pub const MAX_EVENTS_PER_JOB: usize = 512;

/// A cancellation flag shared by the requester and the running computation.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the computation to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_canceled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Error::Canceled)` once [`cancel`](Self::cancel) was called: for `?` between steps.
    pub fn check(&self) -> Result<()> {
        if self.is_canceled() {
            Err(Error::Canceled)
        } else {
            Ok(())
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    /// Succeeded, failed or canceled: nothing changes any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

/// How far a computation is: `step` of `steps` units (tiles, sampler steps) of `stage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub stage: String,
    pub step: usize,
    pub steps: usize,
    /// `step / steps` in [0, 1] (0 when `steps` is 0).
    pub fraction: f64,
    /// Seconds left, extrapolated from the time spent so far (none before the first step).
    pub eta_s: Option<f64>,
}

/// Counts steps of one stage and turns them into [`Progress`] with an ETA.
#[derive(Debug, Clone)]
pub struct ProgressMeter {
    stage: String,
    step: usize,
    steps: usize,
    started: Instant,
}

impl ProgressMeter {
    pub fn new(stage: impl Into<String>, steps: usize) -> Self {
        Self {
            stage: stage.into(),
            step: 0,
            steps,
            started: Instant::now(),
        }
    }

    /// One more step done; returns the new progress.
    pub fn tick(&mut self) -> Progress {
        self.step += 1;
        self.progress()
    }

    pub fn progress(&self) -> Progress {
        let fraction = if self.steps == 0 {
            0.0
        } else {
            (self.step as f64 / self.steps as f64).min(1.0)
        };
        let eta_s = (self.step > 0).then(|| {
            let spent = self.started.elapsed().as_secs_f64();
            spent / self.step as f64 * self.steps.saturating_sub(self.step) as f64
        });
        Progress {
            stage: self.stage.clone(),
            step: self.step,
            steps: self.steps,
            fraction,
            eta_s,
        }
    }
}

/// A job's id: 16 hex digits, random (not guessable from another job's id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    fn random() -> Self {
        Self(format!("{:016x}", rand::random::<u64>()))
    }

    /// Parses an id as given by a client; `None` when it cannot be one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One change of a job: its status, progress and error after the change. `seq` numbers a
/// job's events from 1 (SSE's event id).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobEvent {
    pub seq: u64,
    pub status: JobStatus,
    pub progress: Option<Progress>,
    pub error: Option<String>,
}

/// A snapshot of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    pub id: JobId,
    pub status: JobStatus,
    /// 0 for the next job to run; only while queued.
    pub queue_position: Option<usize>,
    pub progress: Option<Progress>,
    pub error: Option<String>,
    /// Whether cancellation was asked for (a processing job stops at its next check).
    pub cancel_requested: bool,
}

/// Called with each event of a job while it returns `true`; dropped when it returns `false`
/// or the job ends. Runs under the queue's lock: keep it short (send on a channel).
pub type Subscriber = Box<dyn FnMut(&JobEvent) -> bool + Send>;

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// As many jobs wait as the queue holds.
    Full,
    /// The queue was closed (shutting down).
    Closed,
}

/// How a job's run ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed(String),
    Canceled,
}

/// The job the worker is to run now.
pub struct Running<T> {
    pub id: JobId,
    pub payload: T,
    pub cancel: CancelToken,
}

struct Entry<T> {
    status: JobStatus,
    progress: Option<Progress>,
    error: Option<String>,
    events: VecDeque<JobEvent>,
    seq: u64,
    subscribers: Vec<Subscriber>,
    cancel: CancelToken,
    payload: Option<T>,
    finished: Option<Instant>,
}

impl<T> Entry<T> {
    /// Records the current state as a new event and tells the subscribers.
    fn emit(&mut self) {
        self.seq += 1;
        let ev = JobEvent {
            seq: self.seq,
            status: self.status,
            progress: self.progress.clone(),
            error: self.error.clone(),
        };
        if self.events.len() >= MAX_EVENTS_PER_JOB {
            // Keep the first event (queued) and drop the oldest progress event after it.
            self.events.remove(1);
        }
        self.events.push_back(ev.clone());
        self.subscribers.retain_mut(|s| s(&ev));
        if self.status.is_final() {
            self.subscribers.clear();
            self.finished = Some(Instant::now());
        }
    }
}

struct State<T> {
    entries: HashMap<JobId, Entry<T>>,
    queued: VecDeque<JobId>,
    running: Option<JobId>,
    /// Final jobs, oldest first (for pruning).
    done: VecDeque<JobId>,
    closed: bool,
}

/// A bounded FIFO of jobs carrying payloads `T`, run one at a time by a worker calling
/// [`next`](Self::next) and [`finish`](Self::finish).
pub struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

impl<T> JobQueue<T> {
    /// A queue holding at most `capacity` waiting jobs (the running one not counted).
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                entries: HashMap::new(),
                queued: VecDeque::new(),
                running: None,
                done: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panicking subscriber must not take the queue down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues a job; returns its id and queue position (0: runs next).
    pub fn submit(&self, payload: T) -> std::result::Result<(JobId, usize), SubmitError> {
        let mut st = self.lock();
        if st.closed {
            return Err(SubmitError::Closed);
        }
        if st.queued.len() >= self.capacity {
            return Err(SubmitError::Full);
        }
        let mut id = JobId::random();
        while st.entries.contains_key(&id) {
            id = JobId::random();
        }
        let mut entry = Entry {
            status: JobStatus::Queued,
            progress: None,
            error: None,
            events: VecDeque::new(),
            seq: 0,
            subscribers: Vec::new(),
            cancel: CancelToken::new(),
            payload: Some(payload),
            finished: None,
        };
        entry.emit();
        st.entries.insert(id.clone(), entry);
        st.queued.push_back(id.clone());
        let pos = st.queued.len() - 1;
        drop(st);
        self.ready.notify_all();
        Ok((id, pos))
    }

    /// Blocks until a job is queued and marks it processing; `None` once the queue is closed.
    pub fn next(&self) -> Option<Running<T>> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return None;
            }
            if let Some(id) = st.queued.pop_front() {
                let entry = st.entries.get_mut(&id).expect("queued job has an entry");
                entry.status = JobStatus::Processing;
                let payload = entry.payload.take().expect("queued job has its payload");
                let cancel = entry.cancel.clone();
                entry.emit();
                st.running = Some(id.clone());
                return Some(Running {
                    id,
                    payload,
                    cancel,
                });
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Reports the running job's progress.
    pub fn progress(&self, id: &JobId, progress: Progress) {
        let mut st = self.lock();
        if let Some(e) = st.entries.get_mut(id) {
            if e.status == JobStatus::Processing {
                e.progress = Some(progress);
                e.emit();
            }
        }
    }

    /// Ends the running job. A failure after a cancellation request counts as canceled.
    pub fn finish(&self, id: &JobId, outcome: Outcome) {
        let mut st = self.lock();
        if st.running.as_ref() == Some(id) {
            st.running = None;
        }
        let Some(e) = st.entries.get_mut(id) else {
            return;
        };
        if e.status.is_final() {
            return;
        }
        match outcome {
            Outcome::Succeeded => e.status = JobStatus::Succeeded,
            Outcome::Failed(_) | Outcome::Canceled if e.cancel.is_canceled() => {
                e.status = JobStatus::Canceled;
                e.error = Some("canceled".into());
            }
            Outcome::Canceled => {
                e.status = JobStatus::Canceled;
                e.error = Some("canceled".into());
            }
            Outcome::Failed(msg) => {
                e.status = JobStatus::Failed;
                e.error = Some(msg);
            }
        }
        e.emit();
        st.done.push_back(id.clone());
        drop(st);
        self.ready.notify_all();
    }

    /// Cancels a job: a queued one is dropped at once (its payload returned), a processing
    /// one is asked to stop. `None` for an unknown id; otherwise the status after the call.
    pub fn cancel(&self, id: &JobId) -> Option<(JobStatus, Option<T>)> {
        let mut st = self.lock();
        let status = st.entries.get(id)?.status;
        match status {
            JobStatus::Queued => {
                st.queued.retain(|q| q != id);
                let e = st.entries.get_mut(id).expect("checked");
                e.status = JobStatus::Canceled;
                e.error = Some("canceled".into());
                let payload = e.payload.take();
                e.emit();
                st.done.push_back(id.clone());
                Some((JobStatus::Canceled, payload))
            }
            JobStatus::Processing => {
                let e = st.entries.get_mut(id).expect("checked");
                e.cancel.cancel();
                Some((JobStatus::Processing, None))
            }
            s => Some((s, None)),
        }
    }

    pub fn info(&self, id: &JobId) -> Option<JobInfo> {
        let st = self.lock();
        let e = st.entries.get(id)?;
        Some(JobInfo {
            id: id.clone(),
            status: e.status,
            queue_position: (e.status == JobStatus::Queued)
                .then(|| st.queued.iter().position(|q| q == id))
                .flatten(),
            progress: e.progress.clone(),
            error: e.error.clone(),
            cancel_requested: e.cancel.is_canceled(),
        })
    }

    /// The job's events after `after` (all with `None`), then `sub` for the later ones (not
    /// registered when the job has ended). `None` for an unknown id.
    pub fn subscribe(
        &self,
        id: &JobId,
        after: Option<u64>,
        sub: Subscriber,
    ) -> Option<Vec<JobEvent>> {
        let mut st = self.lock();
        let e = st.entries.get_mut(id)?;
        let after = after.unwrap_or(0);
        let past = e
            .events
            .iter()
            .filter(|ev| ev.seq > after)
            .cloned()
            .collect();
        if !e.status.is_final() {
            e.subscribers.push(sub);
        }
        Some(past)
    }

    /// Jobs waiting, and the id of the running one.
    pub fn load(&self) -> (usize, Option<JobId>) {
        let st = self.lock();
        (st.queued.len(), st.running.clone())
    }

    /// Stops taking jobs: queued ones are canceled (their payloads returned), the running one
    /// is asked to stop (its id returned), and [`next`](Self::next) returns `None`.
    pub fn close(&self) -> (Vec<(JobId, T)>, Option<JobId>) {
        let mut st = self.lock();
        st.closed = true;
        let mut dropped = Vec::new();
        while let Some(id) = st.queued.pop_front() {
            if let Some(e) = st.entries.get_mut(&id) {
                e.status = JobStatus::Canceled;
                e.error = Some("canceled: the server is shutting down".into());
                let payload = e.payload.take();
                e.emit();
                if let Some(p) = payload {
                    dropped.push((id.clone(), p));
                }
            }
            st.done.push_back(id);
        }
        let running = st.running.clone();
        if let Some(id) = &running {
            if let Some(e) = st.entries.get(id) {
                e.cancel.cancel();
            }
        }
        drop(st);
        self.ready.notify_all();
        (dropped, running)
    }

    /// Forgets final jobs that ended more than `max_age` ago, and the oldest ones beyond
    /// `max_kept`; returns their ids (so their files can be deleted).
    pub fn prune(&self, max_age: Duration, max_kept: usize) -> Vec<JobId> {
        let mut st = self.lock();
        let mut removed = Vec::new();
        while let Some(id) = st.done.front().cloned() {
            let old = st
                .entries
                .get(&id)
                .and_then(|e| e.finished)
                .is_none_or(|t| t.elapsed() >= max_age);
            if st.done.len() > max_kept || old {
                st.done.pop_front();
                st.entries.remove(&id);
                removed.push(id);
            } else {
                break;
            }
        }
        removed
    }
}
