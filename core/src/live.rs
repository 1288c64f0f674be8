//! The live view: versioned snapshots of the topology, its groups and the live CPUs, and the
//! [`Monitor`] threads that keep them current.
//!
//! [`LiveView`] owns the published [`Snapshot`]. Invariants:
//!
//! 1. Epochs are strictly increasing, start at 1, and a new epoch is published only when the
//!    remembered [`Topology`] (hence possibly `live`) or the groups config changed; an identical
//!    reading publishes nothing.
//! 2. Every publication reaches, in this order and before `apply` returns: every
//!    [`LiveView::on_change`] listener (the engine applies it there), then
//!    [`LiveView::current`] (lock-free, `arc-swap`) and the `watch` channel of
//!    [`LiveView::subscribe`] — so a watcher that sees epoch *e* knows the engine already
//!    schedules by it, and a result can be checked against exactly that epoch. Because publications are serialised by one mutex,
//!    listeners see every epoch exactly once, in epoch order, with no gap after registration.
//! 3. `live = online ∩ allowed`, minus `isolated` unless [`LiveConfig::include_isolated`].
//! 4. A snapshot's `groups` is `GroupMap::build(topology, groups config)`; when a rebuild gives an
//!    equal map the previous `Arc` is kept, so `Arc::ptr_eq` tells "groups unchanged" cheaply.
//!
//! The publish protocol (all under `LiveView::state`):
//!
//! 1. count the event for its source;
//! 2. merge the reading into the current topology ([`Topology::merge`]); stop if equal;
//! 3. compute `live`, rebuild the group map;
//! 4. call the listeners, then store the snapshot in `current` and send it on the watch
//!    channel.
//!
//! Races and why they are safe: a reader of `current` while listeners run still sees the
//! previous snapshot, so nothing outside can observe an epoch the engine has not applied;
//! listeners must not read `current` for the new snapshot (they are handed it). Two monitors or a monitor and `rescan_now` applying at once are serialised by the
//! mutex; each reading is merged into whatever was published last, and merging is monotone in
//! membership, so the order of two concurrent readings only decides which masks are current
//! until the next read. Listeners run under the mutex: they must be quick and must not call
//! back into `apply`, `set_groups_config` or `on_change` (that would deadlock). A panicking
//! listener is logged and skipped; it does not stop later listeners or poison the view.
//!
//! [`Monitor`] runs the sources: a rescan thread (periodic, and on demand from the uevent thread,
//! worker [`Reporter`]s) and an optional uevent thread. Triggers queue on one channel and are
//! coalesced: a burst of reports costs one read, which starts after all of them were received,
//! so it sees at least what each trigger saw. Most reads are [`Reader::rescan`]s of the thread's
//! previous reading (the masks, plus the per-CPU files of CPUs whose online state changed, of
//! the CPUs named by the burst's uevents and reports, and of their siblings); a full
//! [`Reader::read`] is done first, after lost uevents, and whenever the last full read is
//! [`FULL_READ_EVERY`] old, which bounds how long a change of an online CPU's topology files
//! without a hotplug goes unseen.

use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::cpuset::CpuSet;
use crate::groups::{GroupMap, GroupsConfig};
use crate::topology::sysfs::Reader;
use crate::topology::uevent::UeventSocket;
use crate::topology::{Reading, Topology, TopologyError};

/// Errors of the live layer.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("reading the topology: {0}")]
    Read(#[from] TopologyError),
    #[error("spawning thread {name}: {source}")]
    Spawn {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What caused a snapshot (or an attempt to make one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The reading [`LiveView::new`] started from.
    Initial,
    /// A kernel CPU online/offline uevent triggered a rescan.
    Uevent,
    /// The periodic rescan.
    Rescan,
    /// A worker reported trouble with its CPU ([`Reporter::report`]).
    Worker,
    /// An explicit call: [`Monitor::rescan_now`], [`LiveView::set_groups_config`].
    Manual,
}

impl Source {
    /// Every source, in declaration order.
    pub const ALL: [Source; 5] = [
        Source::Initial,
        Source::Uevent,
        Source::Rescan,
        Source::Worker,
        Source::Manual,
    ];

    /// A lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Initial => "initial",
            Source::Uevent => "uevent",
            Source::Rescan => "rescan",
            Source::Worker => "worker",
            Source::Manual => "manual",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One published version of the machine. Immutable once published.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Strictly increasing from 1.
    pub epoch: u64,
    pub topology: Arc<Topology>,
    pub groups: Arc<GroupMap>,
    /// The CPUs work may run on now (see [`live_set`]).
    pub live: CpuSet,
    /// What caused this snapshot.
    pub source: Source,
    /// When it was published.
    pub at: SystemTime,
}

/// Settings of the live view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveConfig {
    /// Count isolated CPUs (`isolated`, `isolcpus=`, `nohz_full=`) as live.
    pub include_isolated: bool,
    pub groups: GroupsConfig,
}

/// Counters of one source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Readings (or config changes) applied from this source, whether or not they changed
    /// anything.
    pub events: u64,
    /// Epochs this source published.
    pub epochs: u64,
}

/// Counters of a [`LiveView`], a consistent copy taken under its lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// The current epoch.
    pub epoch: u64,
    by_source: [SourceStats; 5],
}

impl LiveStats {
    /// The counters of `source`.
    pub fn get(&self, source: Source) -> SourceStats {
        self.by_source[source.index()]
    }

    /// Every source with its counters.
    pub fn iter(&self) -> impl Iterator<Item = (Source, SourceStats)> + '_ {
        Source::ALL.iter().map(|s| (*s, self.get(*s)))
    }
}

/// A function called with every new snapshot; see [`LiveView::on_change`].
pub type Listener = Box<dyn Fn(&Arc<Snapshot>) + Send + Sync>;

/// `online ∩ allowed`, minus `isolated` unless `include_isolated`.
pub fn live_set(topology: &Topology, include_isolated: bool) -> CpuSet {
    let live = topology.online.intersection(&topology.allowed);
    if include_isolated {
        live
    } else {
        live.difference(&topology.isolated)
    }
}

/// State that only the holder of [`LiveView::state`] may touch.
struct State {
    cfg: LiveConfig,
    listeners: Vec<Listener>,
    stats: LiveStats,
}

/// The versioned live view. Shared as `Arc<LiveView>`.
pub struct LiveView {
    /// The published snapshot. Stored only under `state`; loaded lock-free by anyone.
    current: ArcSwap<Snapshot>,
    /// Sent only under `state`; any number of receivers.
    watch: watch::Sender<Arc<Snapshot>>,
    /// Serialises every publication (see the module docs).
    state: Mutex<State>,
}

impl std::fmt::Debug for LiveView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveView")
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

impl LiveView {
    /// Starts at epoch 1 from `first` (source [`Source::Initial`]).
    pub fn new(first: Reading, cfg: LiveConfig) -> Arc<LiveView> {
        let topology = Topology::merge(None, first);
        let snap = Arc::new(Snapshot {
            epoch: 1,
            live: live_set(&topology, cfg.include_isolated),
            groups: Arc::new(GroupMap::build(&topology, &cfg.groups)),
            topology: Arc::new(topology),
            source: Source::Initial,
            at: SystemTime::now(),
        });
        let mut stats = LiveStats {
            epoch: 1,
            ..LiveStats::default()
        };
        stats.by_source[Source::Initial.index()] = SourceStats {
            events: 1,
            epochs: 1,
        };
        let (watch, _) = watch::channel(snap.clone());
        Arc::new(LiveView {
            current: ArcSwap::new(snap),
            watch,
            state: Mutex::new(State {
                cfg,
                listeners: Vec::new(),
                stats,
            }),
        })
    }

    /// The latest snapshot. Lock-free.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Folds `reading` into the remembered topology and publishes a new epoch if the topology
    /// (hence `live`) changed. Returns the new snapshot, or `None` when nothing changed.
    ///
    /// On return the snapshot is visible through [`current`](Self::current) and the watch
    /// channel, and every listener has been called with it.
    pub fn apply(&self, reading: Reading, source: Source) -> Option<Arc<Snapshot>> {
        let mut st = self.state.lock();
        st.stats.by_source[source.index()].events += 1;
        let prev = self.current.load_full();
        let topology = Topology::merge(Some(&prev.topology), reading);
        if topology == *prev.topology {
            return None;
        }
        let groups = build_groups(&topology, &st.cfg.groups, &prev.groups);
        let live = live_set(&topology, st.cfg.include_isolated);
        tracing::debug!(
            epoch = prev.epoch + 1,
            source = source.as_str(),
            live = %live,
            online = %topology.online,
            "topology changed"
        );
        Some(self.publish(&mut st, &prev, Arc::new(topology), groups, live, source))
    }

    /// Replaces the groups config (config reload) and publishes a new epoch, with source
    /// [`Source::Manual`], when it differs from the current one. Returns the new snapshot.
    pub fn set_groups_config(&self, groups: GroupsConfig) -> Option<Arc<Snapshot>> {
        let mut st = self.state.lock();
        st.stats.by_source[Source::Manual.index()].events += 1;
        if st.cfg.groups == groups {
            return None;
        }
        st.cfg.groups = groups;
        let prev = self.current.load_full();
        let map = build_groups(&prev.topology, &st.cfg.groups, &prev.groups);
        let live = prev.live.clone();
        let topology = prev.topology.clone();
        Some(self.publish(&mut st, &prev, topology, map, live, Source::Manual))
    }

    /// A receiver that always holds the latest snapshot, for async watchers.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.watch.subscribe()
    }

    /// Registers `listener`, called synchronously inside every later publication, in epoch
    /// order. Returns the snapshot current at registration: the listener sees every epoch after
    /// it and none before. The listener must not call back into this view's mutating methods.
    pub fn on_change(&self, listener: Listener) -> Arc<Snapshot> {
        let mut st = self.state.lock();
        st.listeners.push(listener);
        self.current.load_full()
    }

    /// The counters, per source.
    pub fn stats(&self) -> LiveStats {
        self.state.lock().stats.clone()
    }

    /// The config in force.
    pub fn config(&self) -> LiveConfig {
        self.state.lock().cfg.clone()
    }

    fn publish(
        &self,
        st: &mut State,
        prev: &Snapshot,
        topology: Arc<Topology>,
        groups: Arc<GroupMap>,
        live: CpuSet,
        source: Source,
    ) -> Arc<Snapshot> {
        let snap = Arc::new(Snapshot {
            epoch: prev.epoch + 1,
            topology,
            groups,
            live,
            source,
            at: SystemTime::now(),
        });
        st.stats.epoch = snap.epoch;
        st.stats.by_source[source.index()].epochs += 1;
        // Listeners (the engine) first: whoever sees the new epoch through `current` or the
        // watch channel can count on the engine having applied it.
        for (i, listener) in st.listeners.iter().enumerate() {
            if catch_unwind(AssertUnwindSafe(|| listener(&snap))).is_err() {
                tracing::error!(
                    listener = i,
                    epoch = snap.epoch,
                    "live view listener panicked"
                );
            }
        }
        self.current.store(snap.clone());
        self.watch.send_replace(snap.clone());
        snap
    }
}

/// Rebuilds the group map, keeping `prev`'s `Arc` when the result is equal.
fn build_groups(topology: &Topology, cfg: &GroupsConfig, prev: &Arc<GroupMap>) -> Arc<GroupMap> {
    let map = GroupMap::build(topology, cfg);
    if map == **prev {
        prev.clone()
    } else {
        Arc::new(map)
    }
}

/// Settings of a [`Monitor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    /// Period of the rescan.
    pub rescan: Duration,
    /// Listen to kernel uevents for immediate rescans.
    pub netlink: bool,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            rescan: Duration::from_secs(1),
            netlink: true,
        }
    }
}

enum Cmd {
    /// Read now; `Some(cpu)`: `cpu` had an event, re-read its files (and its siblings').
    Rescan(Source, Option<u32>),
    /// Read every CPU's files now (uevents were lost).
    ReadAll(Source),
    Stop,
}

/// The monitor's rescans re-read every online CPU's files (a full [`Reader::read`]) at least
/// this often; in between they re-read only what hotplug changes ([`Reader::rescan`]). With a
/// rescan period at or above it, every periodic rescan is a full read.
pub const FULL_READ_EVERY: Duration = Duration::from_secs(60);

/// Runs the sources of a [`LiveView`] on named threads until stopped or dropped.
#[derive(Debug)]
pub struct Monitor {
    /// Immutable after start.
    reader: Reader,
    view: Arc<LiveView>,
    tx: Sender<Cmd>,
    /// Set once by `shutdown`; read by the uevent thread.
    stop: Arc<AtomicBool>,
    /// Dropped by `shutdown`, which wakes the uevent thread (it waits on the other end).
    uevent_wake: Option<UnixStream>,
    /// Owned by `shutdown`, which joins them.
    threads: Vec<JoinHandle<()>>,
    netlink_active: bool,
    /// Shared with every [`Reporter`]; relaxed, a statistic only.
    reports: Arc<AtomicU64>,
}

/// Lets workers ask for an immediate rescan. Cheap to clone; sending never blocks.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: Sender<Cmd>,
    reports: Arc<AtomicU64>,
}

impl Reporter {
    /// A worker saw something wrong with `cpu` (it went offline under it, affinity failed):
    /// triggers a rescan with source [`Source::Worker`]. Does nothing once the monitor stopped.
    pub fn report(&self, cpu: u32, reason: &str) {
        self.reports.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cpu, reason, "worker reported a CPU problem; rescanning");
        let _ = self.tx.send(Cmd::Rescan(Source::Worker, Some(cpu)));
    }

    /// Reports made to this monitor, through any of its reporters.
    pub fn reports(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }
}

impl Monitor {
    /// Starts the rescan thread (`wqd-topo-rescan`) and, if `cfg.netlink` and the socket opens,
    /// the uevent thread (`wqd-topo-uevent`). A socket that cannot be opened is logged; the
    /// periodic rescan then carries on alone (see [`netlink_active`](Self::netlink_active)).
    ///
    /// # Errors
    /// [`LiveError::Spawn`] when a thread cannot be spawned (nothing is left running).
    pub fn start(
        reader: Reader,
        view: Arc<LiveView>,
        cfg: MonitorConfig,
    ) -> Result<Monitor, LiveError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut monitor = Monitor {
            reader,
            view,
            tx,
            stop: Arc::new(AtomicBool::new(false)),
            uevent_wake: None,
            threads: Vec::new(),
            netlink_active: false,
            reports: Arc::new(AtomicU64::new(0)),
        };
        let (reader, view, period) = (monitor.reader.clone(), monitor.view.clone(), cfg.rescan);
        let rescan = spawn("wqd-topo-rescan", move || {
            rescan_loop(&reader, &view, &rx, period)
        })?;
        monitor.threads.push(rescan);
        if cfg.netlink {
            let opened = UeventSocket::open()
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    let pair = UnixStream::pair()
                        .map_err(|e| format!("no socket pair to wake the uevent thread: {e}"))?;
                    Ok((s, pair))
                });
            match opened {
                Ok((sock, (wake, woken))) => {
                    let (tx, stop) = (monitor.tx.clone(), monitor.stop.clone());
                    monitor.uevent_wake = Some(wake);
                    // On error `monitor` drops here, which stops the rescan thread.
                    let t = spawn("wqd-topo-uevent", move || {
                        uevent_loop(&sock, &woken, &tx, &stop)
                    })?;
                    monitor.threads.push(t);
                    monitor.netlink_active = true;
                }
                Err(e) => {
                    tracing::warn!(error = e, "no uevent socket; relying on periodic rescans")
                }
            }
        }
        Ok(monitor)
    }

    /// A handle for workers to report CPU trouble.
    pub fn reporter(&self) -> Reporter {
        Reporter {
            tx: self.tx.clone(),
            reports: self.reports.clone(),
        }
    }

    /// Whether the uevent thread is running.
    pub fn netlink_active(&self) -> bool {
        self.netlink_active
    }

    /// Reads and applies now, on the calling thread, with source [`Source::Manual`].
    ///
    /// # Errors
    /// [`LiveError::Read`] when the read fails; the view is then unchanged.
    pub fn rescan_now(&self) -> Result<Option<Arc<Snapshot>>, LiveError> {
        let reading = self.reader.read()?;
        Ok(self.view.apply(reading, Source::Manual))
    }

    /// Stops and joins the threads. Postcondition: no monitor thread runs and no further
    /// snapshot comes from this monitor. Takes at most one read in progress.
    pub fn stop(self) {
        drop(self);
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Closing our end makes the uevent thread's end readable: it wakes and sees `stop`.
        self.uevent_wake = None;
        let _ = self.tx.send(Cmd::Stop);
        for t in self.threads.drain(..) {
            let name = t.thread().name().unwrap_or("?").to_string();
            if t.join().is_err() {
                tracing::error!(thread = name, "monitor thread panicked");
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(
    name: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, LiveError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|source| LiveError::Spawn { name, source })
}

/// What one coalesced burst of triggers asks the rescan thread to read.
struct Ask {
    /// The first trigger's source, which the reading is counted under.
    source: Source,
    /// CPUs that had an event: their files are re-read even if the masks look unchanged.
    cpus: CpuSet,
    /// Read every CPU's files.
    all: bool,
}

impl Ask {
    fn new(source: Source) -> Ask {
        Ask {
            source,
            cpus: CpuSet::new(),
            all: false,
        }
    }

    /// Adds one trigger; `false` for [`Cmd::Stop`].
    fn add(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Stop => return false,
            Cmd::Rescan(_, Some(cpu)) => {
                self.cpus.insert(cpu);
            }
            Cmd::Rescan(_, None) => {}
            Cmd::ReadAll(_) => self.all = true,
        }
        true
    }
}

fn rescan_loop(reader: &Reader, view: &LiveView, rx: &Receiver<Cmd>, period: Duration) {
    let mut next = Instant::now() + period;
    // The previous reading, which a rescan brings up to date, and when the last full read was.
    let mut last: Option<(Reading, Instant)> = None;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        let ask = match rx.recv_timeout(wait) {
            Ok(Cmd::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(cmd @ (Cmd::Rescan(source, _) | Cmd::ReadAll(source))) => {
                let mut ask = Ask::new(source);
                ask.add(cmd);
                // Coalesce a burst into one read that starts after all of it.
                for cmd in rx.try_iter() {
                    if !ask.add(cmd) {
                        return;
                    }
                }
                ask
            }
            Err(RecvTimeoutError::Timeout) => {
                next = Instant::now() + period;
                Ask::new(Source::Rescan)
            }
        };
        let source = ask.source;
        let read = match &mut last {
            Some((prev, full_at)) if !ask.all && full_at.elapsed() < FULL_READ_EVERY => {
                reader.rescan(prev, &ask.cpus).map(|reread| {
                    if !reread.is_empty() {
                        tracing::debug!(cpus = %reread, "rescan re-read these CPUs' files");
                    }
                    prev.clone()
                })
            }
            _ => reader
                .read()
                .inspect(|r| last = Some((r.clone(), Instant::now()))),
        };
        match read {
            Ok(reading) => {
                view.apply(reading, source);
            }
            Err(e) => {
                tracing::warn!(error = %e, source = source.as_str(), "topology read failed; retrying at the next tick")
            }
        }
    }
}

/// Blocks on the socket and on `woken` (the monitor closes its peer to stop it): no wake-up
/// while nothing happens.
fn uevent_loop(sock: &UeventSocket, woken: &UnixStream, tx: &Sender<Cmd>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match sock.recv_or_wake(woken) {
            Ok(None) => {}
            Ok(Some(ev)) => {
                tracing::debug!(cpu = ev.cpu, online = ev.online, "cpu uevent");
                let _ = tx.send(Cmd::Rescan(Source::Uevent, Some(ev.cpu)));
            }
            Err(TopologyError::Netlink(nix::errno::Errno::ENOBUFS)) => {
                // Which CPUs had events is lost with them.
                tracing::warn!("uevents were dropped (socket buffer full); reading everything");
                let _ = tx.send(Cmd::ReadAll(Source::Uevent));
            }
            Err(e) => {
                tracing::warn!(error = %e, "uevent socket failed; relying on periodic rescans");
                return;
            }
        }
    }
}

/// For unit tests: a snapshot (epoch 1) of a flat machine whose CPUs `all` are all online,
/// allowed and live, without per-CPU topology (no caches, cores or nodes).
#[cfg(test)]
pub(crate) fn flat_snapshot(all: &CpuSet) -> Arc<Snapshot> {
    use crate::topology::{AllowedSource, Topology};
    let topo = Topology {
        possible: all.clone(),
        present: all.clone(),
        online: all.clone(),
        isolated: CpuSet::new(),
        allowed: all.clone(),
        allowed_source: AllowedSource::AllOnline,
        cpus: Default::default(),
        nodes: Default::default(),
    };
    let groups = crate::groups::GroupMap::build(&topo, &Default::default());
    Arc::new(Snapshot {
        epoch: 1,
        topology: Arc::new(topo),
        groups: Arc::new(groups),
        live: all.clone(),
        source: Source::Manual,
        at: SystemTime::now(),
    })
}
