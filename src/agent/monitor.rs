//! AgentMonitor: supervision of the agent's worker threads (`flows` with `flowstore`,
//! `uploader`, `evsync`, `control`, `netwatch`).
//!
//! A worker whose thread ends while the agent runs (it returned, or panicked in a build that
//! unwinds) is stopped whole, counted, logged, reported to the PCE as an event and started again
//! after a backoff that doubles from [`FIRST_BACKOFF`] to [`LONGEST_BACKOFF`]; a worker that then
//! runs for [`STABLE_AFTER`] starts from the first backoff again. The manager checks its workers
//! at each turn of its loop; a worker's thread that ends wakes the manager through its input
//! queue, so the monitor has no timer of its own and costs no wake-up while all is well.
//!
//! In release builds (`panic = "abort"`) a panic ends the whole process instead: the init system
//! restarts the agent, which restores the last-known-good firewall without ever removing it, and
//! the PCE does not count a crash restart as a goodbye.
//!
//! The fault switch ([`Fault`], configuration key `test_fault`) makes a named thread end or panic
//! at its start for its first N starts. It exists for the tests of this module's promise and is
//! off unless the key is set.

use std::sync::mpsc::SyncSender;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Input;

/// The first wait before a worker that ended is started again; it doubles at each restart.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between restarts of a worker that keeps ending.
pub const LONGEST_BACKOFF: Duration = Duration::from_secs(300);
/// A worker that ran this long since its last restart is healthy again: its backoff resets.
pub const STABLE_AFTER: Duration = Duration::from_secs(600);
/// Most workers one monitor supervises.
pub const MAX_WORKERS: usize = 8;
/// Longest failure message kept per worker.
const MAX_CAUSE_CHARS: usize = 300;

/// A running worker: one or more threads that stop together.
pub trait Worker: Send {
    /// Whether any of its threads has ended.
    fn ended(&self) -> bool;
    /// Stops the threads still running and joins them all; `Some(message)` when one panicked.
    fn stop(self: Box<Self>) -> Option<String>;
}

/// Starts a worker (again).
pub type Starter = Box<dyn FnMut() -> std::io::Result<Box<dyn Worker>> + Send>;

/// How a worker is doing, for `ven status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ComponentStatus {
    pub name: String,
    pub state: ComponentState,
    /// Times it ended and was started again since the agent started.
    pub restarts: u64,
    /// Unix seconds and cause of its last failure.
    pub last_failure: Option<(u64, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ComponentState {
    Running,
    /// Ended; starts again after its backoff.
    Restarting,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Restarting => "restarting",
        }
    }
}

/// A worker that ended, as the manager reports it to the PCE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub name: &'static str,
    pub restarts: u64,
    pub cause: String,
}

struct Slot {
    name: &'static str,
    start: Starter,
    running: Option<Box<dyn Worker>>,
    started_at: Instant,
    restarts: u64,
    backoff: Duration,
    restart_at: Option<Instant>,
    last_failure: Option<(u64, String)>,
}

/// The supervised workers, owned by the manager.
#[derive(Default)]
pub struct Monitor {
    slots: Vec<Slot>,
}

impl Monitor {
    /// Supervises `running` (already started; `None` when its first start failed, which is then
    /// retried after the first backoff) under `name`, started again with `start`.
    pub fn adopt(&mut self, name: &'static str, running: Option<Box<dyn Worker>>, start: Starter) {
        self.remove(name);
        if self.slots.len() == MAX_WORKERS {
            log::error!("monitor: more than {MAX_WORKERS} workers; {name} is not supervised");
            return;
        }
        let now = Instant::now();
        let restart_at = running.is_none().then(|| now + FIRST_BACKOFF);
        self.slots.push(Slot {
            name,
            start,
            running,
            started_at: now,
            restarts: 0,
            backoff: FIRST_BACKOFF,
            restart_at,
            last_failure: None,
        });
    }

    /// Starts `name` with `start` and supervises it.
    pub fn start(&mut self, name: &'static str, mut start: Starter) {
        let running = match start() {
            Ok(worker) => Some(worker),
            Err(e) => {
                log::error!("cannot start the {name} thread: {e}; trying again in {FIRST_BACKOFF:?}");
                None
            }
        };
        self.adopt(name, running, start);
    }

    /// Stops `name` (when supervised) and forgets it.
    pub fn remove(&mut self, name: &str) {
        if let Some(index) = self.slots.iter().position(|slot| slot.name == name) {
            let slot = self.slots.remove(index);
            if let Some(worker) = slot.running {
                let _ = worker.stop();
            }
        }
    }

    /// Collects the workers that ended and starts those whose backoff is over; returns the ones
    /// that ended (for the log has them already, the manager reports them to the PCE).
    pub fn check(&mut self, now: Instant) -> Vec<Ended> {
        let mut ended = Vec::new();
        for slot in &mut self.slots {
            if slot.running.as_ref().is_some_and(|worker| worker.ended()) {
                let Some(worker) = slot.running.take() else { continue };
                let cause = worker.stop().unwrap_or_else(|| "its thread ended".to_string());
                let cause: String = cause.chars().take(MAX_CAUSE_CHARS).collect();
                if now.duration_since(slot.started_at) >= STABLE_AFTER {
                    slot.backoff = FIRST_BACKOFF;
                }
                slot.restarts += 1;
                slot.restart_at = Some(now + slot.backoff);
                log::error!(
                    "the {} thread ended ({cause}); restart {} in {:?}",
                    slot.name,
                    slot.restarts,
                    slot.backoff
                );
                slot.last_failure = Some((crate::clock::now(), cause.clone()));
                ended.push(Ended { name: slot.name, restarts: slot.restarts, cause });
                slot.backoff = (slot.backoff * 2).min(LONGEST_BACKOFF);
            }
            if slot.restart_at.is_some_and(|at| at <= now) {
                slot.restart_at = None;
                match (slot.start)() {
                    Ok(worker) => {
                        log::info!("the {} thread runs again", slot.name);
                        slot.running = Some(worker);
                        slot.started_at = now;
                    }
                    Err(e) => {
                        log::error!(
                            "cannot start the {} thread: {e}; trying again in {:?}",
                            slot.name,
                            slot.backoff
                        );
                        slot.last_failure = Some((crate::clock::now(), format!("cannot start: {e}")));
                        slot.restart_at = Some(now + slot.backoff);
                        slot.backoff = (slot.backoff * 2).min(LONGEST_BACKOFF);
                    }
                }
            }
        }
        ended
    }

    /// When the next restart is due, if one is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots.iter().filter_map(|slot| slot.restart_at).min()
    }

    pub fn components(&self) -> Vec<ComponentStatus> {
        self.slots
            .iter()
            .map(|slot| ComponentStatus {
                name: slot.name.to_string(),
                state: if slot.running.is_some() {
                    ComponentState::Running
                } else {
                    ComponentState::Restarting
                },
                restarts: slot.restarts,
                last_failure: slot.last_failure.clone(),
            })
            .collect()
    }

    /// Stops every worker, last started first.
    pub fn stop_all(&mut self) {
        while let Some(slot) = self.slots.pop() {
            if let Some(worker) = slot.running {
                let _ = worker.stop();
            }
        }
    }
}

impl Worker for crate::flows::FlowPipeline {
    fn ended(&self) -> bool {
        crate::flows::FlowPipeline::ended(self)
    }
    fn stop(mut self: Box<Self>) -> Option<String> {
        self.stop_joined()
    }
}

/// The manager's input queue, which a supervised thread that ends wakes (set by `agent::run`).
static WAKE: Mutex<Option<SyncSender<Input>>> = Mutex::new(None);
/// The fault switch and how many more starts it hits.
static FAULT: Mutex<Option<(Fault, u32)>> = Mutex::new(None);

/// Where supervised threads report that they ended; `None` stops the reports.
pub fn set_wake(inputs: Option<SyncSender<Input>>) {
    *WAKE.lock().unwrap_or_else(PoisonError::into_inner) = inputs;
}

/// Arms (or, with `None`, disarms) the fault switch.
pub fn set_fault(fault: Option<Fault>) {
    *FAULT.lock().unwrap_or_else(PoisonError::into_inner) = fault.map(|fault| {
        let times = fault.times;
        (fault, times)
    });
}

/// Spawns a supervised thread named `name` running `body`. When it ends, however it ends, it
/// wakes the manager so that the monitor sees it at once.
pub fn spawn<F>(name: &'static str, body: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let fault = take_fault(name);
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let _notice = EndNotice(name);
        match fault {
            Some(FaultKind::Panic) => panic!("test_fault: the {name} thread panics at its start"),
            Some(FaultKind::End) => log::warn!("test_fault: the {name} thread ends at its start"),
            None => body(),
        }
    })
}

/// Wakes the manager when dropped, i.e. when its thread returns or unwinds.
struct EndNotice(&'static str);

impl Drop for EndNotice {
    fn drop(&mut self) {
        if let Some(inputs) = WAKE.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            // A full queue wakes the manager anyway; it checks its workers at every turn.
            let _ = inputs.try_send(Input::WorkerEnded(self.0));
        }
    }
}

/// The message of a thread's panic, from `JoinHandle::join`'s error.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        format!("panicked: {text}")
    } else if let Some(text) = payload.downcast_ref::<String>() {
        format!("panicked: {text}")
    } else {
        "panicked".to_string()
    }
}

/// Joins `thread`; `Some(message)` when it panicked.
pub fn join(thread: JoinHandle<()>) -> Option<String> {
    thread.join().err().map(|payload| panic_message(payload.as_ref()))
}

/// The test-only fault switch: `test_fault = THREAD[:panic][:TIMES]` makes the thread named
/// THREAD end (or panic) at its start, its first TIMES starts (default 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub thread: String,
    pub panic: bool,
    pub times: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    End,
    Panic,
}

/// Threads the fault switch can name.
pub const FAULT_THREADS: [&str; 6] = ["flows", "flowstore", "uploader", "evsync", "control", "netwatch"];

impl Fault {
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut parts = value.split(':').map(str::trim);
        let thread = parts.next().unwrap_or_default().to_string();
        if !FAULT_THREADS.contains(&thread.as_str()) {
            return Err(format!("test_fault names a thread ({}), not {thread:?}", FAULT_THREADS.join(", ")));
        }
        let mut fault = Self { thread, panic: false, times: 1 };
        for part in parts {
            match part {
                "panic" => fault.panic = true,
                "end" => fault.panic = false,
                n => match n.parse::<u32>() {
                    Ok(times) if (1..=100).contains(&times) => fault.times = times,
                    _ => {
                        return Err(format!(
                            "test_fault is THREAD[:panic][:TIMES (1 to 100)], not {value:?}"
                        ));
                    }
                },
            }
        }
        Ok(fault)
    }
}

fn take_fault(name: &str) -> Option<FaultKind> {
    let mut armed = FAULT.lock().unwrap_or_else(PoisonError::into_inner);
    let (fault, left) = armed.as_mut()?;
    if fault.thread != name || *left == 0 {
        return None;
    }
    *left -= 1;
    Some(if fault.panic { FaultKind::Panic } else { FaultKind::End })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A worker whose thread ends when told, or panics.
    struct TestWorker {
        thread: Option<JoinHandle<()>>,
        stop: Arc<AtomicBool>,
    }

    impl Worker for TestWorker {
        fn ended(&self) -> bool {
            self.thread.as_ref().is_none_or(JoinHandle::is_finished)
        }
        fn stop(mut self: Box<Self>) -> Option<String> {
            self.stop.store(true, Ordering::SeqCst);
            self.thread.take().and_then(join)
        }
    }

    fn starter(starts: Arc<AtomicU32>, end_first: u32, panic: bool) -> Starter {
        Box::new(move || {
            let n = starts.fetch_add(1, Ordering::SeqCst);
            let stop = Arc::new(AtomicBool::new(false));
            let thread_stop = Arc::clone(&stop);
            let thread = std::thread::Builder::new().name("test-worker".into()).spawn(move || {
                if n < end_first {
                    if panic {
                        panic!("worker {n} fails");
                    }
                    return;
                }
                while !thread_stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })?;
            Ok(Box::new(TestWorker { thread: Some(thread), stop }) as Box<dyn Worker>)
        })
    }

    fn wait_ended(monitor: &Monitor) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !monitor.slots.iter().all(|slot| slot.running.as_ref().is_none_or(|w| w.ended())) {
            assert!(Instant::now() < deadline, "the worker did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_worker_that_panics_is_counted_and_started_again_after_a_doubling_backoff() {
        let starts = Arc::new(AtomicU32::new(0));
        let mut monitor = Monitor::default();
        monitor.start("test", starter(Arc::clone(&starts), 2, true));
        wait_ended(&monitor);
        let t0 = Instant::now();
        let ended = monitor.check(t0);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].restarts, 1);
        assert!(ended[0].cause.contains("worker 0 fails"), "{}", ended[0].cause);
        assert_eq!(monitor.components()[0].state, ComponentState::Restarting);
        assert_eq!(monitor.next_deadline(), Some(t0 + FIRST_BACKOFF));
        // Not before its backoff.
        assert!(monitor.check(t0 + FIRST_BACKOFF / 2).is_empty());
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        monitor.check(t0 + FIRST_BACKOFF);
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        // The second start fails too: the wait doubles.
        wait_ended(&monitor);
        let t1 = t0 + FIRST_BACKOFF;
        assert_eq!(monitor.check(t1)[0].restarts, 2);
        assert_eq!(monitor.next_deadline(), Some(t1 + FIRST_BACKOFF * 2));
        monitor.check(t1 + FIRST_BACKOFF * 2);
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        let status = &monitor.components()[0];
        assert_eq!((status.state, status.restarts), (ComponentState::Running, 2));
        assert!(status.last_failure.as_ref().is_some_and(|(_, cause)| cause.contains("worker 1 fails")));
        // The third start lives: nothing more happens.
        std::thread::sleep(Duration::from_millis(30));
        assert!(monitor.check(Instant::now()).is_empty());
        monitor.stop_all();
        assert!(monitor.components().is_empty());
    }

    #[test]
    fn a_thread_that_returns_is_restarted_and_the_backoff_resets_after_a_stable_run() {
        let starts = Arc::new(AtomicU32::new(0));
        let mut monitor = Monitor::default();
        monitor.start("test", starter(Arc::clone(&starts), 1, false));
        wait_ended(&monitor);
        let t0 = Instant::now();
        assert_eq!(monitor.check(t0)[0].cause, "its thread ended");
        monitor.check(t0 + FIRST_BACKOFF);
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert_eq!(monitor.slots[0].backoff, FIRST_BACKOFF * 2);
        // Ends again after a long healthy run: the first backoff again.
        if let Some(worker) = monitor.slots[0].running.take() {
            worker.stop();
        }
        monitor.slots[0].started_at = t0;
        monitor.slots[0].running =
            Some(Box::new(TestWorker { thread: None, stop: Arc::new(AtomicBool::new(true)) }));
        let later = t0 + STABLE_AFTER + FIRST_BACKOFF;
        monitor.check(later);
        assert_eq!(monitor.next_deadline(), Some(later + FIRST_BACKOFF));
        monitor.stop_all();
    }

    #[test]
    fn the_fault_switch_parses_and_hits_only_its_thread_and_only_its_count() {
        assert_eq!(
            Fault::parse("uploader").unwrap(),
            Fault { thread: "uploader".into(), panic: false, times: 1 }
        );
        assert_eq!(
            Fault::parse("flows:panic:3").unwrap(),
            Fault { thread: "flows".into(), panic: true, times: 3 }
        );
        assert!(Fault::parse("manager").unwrap_err().contains("names a thread"));
        assert!(Fault::parse("flows:0").is_err());
        assert!(Fault::parse("flows:often").is_err());
        set_fault(Some(Fault::parse("evsync:2").unwrap()));
        assert_eq!(take_fault("flows"), None);
        assert_eq!(take_fault("evsync"), Some(FaultKind::End));
        assert_eq!(take_fault("evsync"), Some(FaultKind::End));
        assert_eq!(take_fault("evsync"), None);
        set_fault(None);
    }
}
