//! Reading the machine: [`Reader::read`] turns one pass over sysfs (and procfs, when a proc root
//! is given) into a [`Reading`]; [`Reader::rescan`] brings an earlier reading up to date,
//! re-reading the per-CPU files only of the CPUs that hotplug may have changed.
//!
//! This module owns every path wqd reads to learn about CPUs, and nothing else: it never writes,
//! keeps no state between reads (a rescan is handed the reading it updates) and remembers
//! nothing (that is [`Topology::merge`]'s job). Invariant: every path is resolved under the
//! injected roots, so the same code reads the host (`/sys`, `/proc`) and the fixture trees of
//! the tests; every error names the path it concerns.
//!
//! What is read, all lists in the kernel cpulist grammar ([`CpuSet::parse_list`]):
//!
//! - `devices/system/cpu/{possible,present,online}` (required) and `isolated` (missing = empty),
//!   plus the `isolcpus=` and `nohz_full=` CPUs of `<proc>/cmdline` when a proc root is given.
//! - For each online CPU N, `devices/system/cpu/cpuN/topology/` and `cpuN/cache/indexK/`. The
//!   kernel removes both folders while N is offline; N is online in the mask but its folder may
//!   vanish while we read (a hotplug race): such a CPU gets no [`CpuTopo`] in this reading.
//! - `devices/system/node/nodeK/cpulist` (no `node/` folder on kernels without NUMA: no nodes)
//!   and the `cpuN/nodeK` link.
//! - The CPUs this process may use: its cpuset cgroup (v1 or v2, found through
//!   `<proc>/self/cgroup` and `<proc>/self/mountinfo`), else `sched_getaffinity(0)`. A fixture
//!   without a proc root reads the root cpuset of the tree, else allows every online CPU.
//!
//! [`Topology::merge`]: super::Topology::merge

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::cpuset::{CpuSet, MAX_CPUS};

use super::{AllowedSource, CacheInfo, CpuTopo, Reading, Topology, TopologyError};

/// Reads sysfs/procfs under injectable roots. Cheap to clone; holds only paths.
///
/// Cost: the masks, nodes and cpuset are a few files plus one per node; each online CPU adds
/// about 30 (`topology/`, `cache/indexK/`), which is what a full read spends its time on
/// (≈ 240 ms at 4 096 CPUs) and what [`rescan`](Self::rescan) mostly skips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    /// Stands in for `/sys`.
    sys: PathBuf,
    /// Stands in for `/proc`; `None` for fixture trees.
    proc: Option<PathBuf>,
    /// Whether mount points from mountinfo are real paths (host) or mapped under `sys`.
    host: bool,
}

impl Reader {
    /// Reads the running machine: `/sys` and `/proc`.
    pub fn host() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc: Some(PathBuf::from("/proc")),
            host: true,
        }
    }

    /// Reads a tree standing in for `/sys`, without procfs: no kernel command line, and the
    /// allowed CPUs come from the tree's root cpuset (`fs/cgroup/cpuset/cpuset.effective_cpus`
    /// for v1, `fs/cgroup/cpuset.cpus.effective` for v2) or else are all online CPUs.
    pub fn fixture(sys_root: impl Into<PathBuf>) -> Self {
        Self {
            sys: sys_root.into(),
            proc: None,
            host: false,
        }
    }

    /// Reads a tree standing in for `/sys` with a tree standing in for `/proc` (tests of cgroup
    /// discovery). Mount points from `<proc>/self/mountinfo` are mapped under `sys_root`: a
    /// leading `/sys` is stripped (`/sys/fs/cgroup/cpuset` is `<sys_root>/fs/cgroup/cpuset`),
    /// any other absolute path is taken relative to `sys_root`. When no cpuset is found the
    /// allowed CPUs are this process's real affinity, as on a host.
    pub fn with_proc(sys_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            sys: sys_root.into(),
            proc: Some(proc_root.into()),
            host: false,
        }
    }

    /// The folder standing in for `/sys`.
    pub fn sys_root(&self) -> &Path {
        &self.sys
    }

    /// The folder standing in for `/proc`, if any.
    pub fn proc_root(&self) -> Option<&Path> {
        self.proc.as_deref()
    }

    /// One full pass over the machine: the masks, then every online CPU's files.
    ///
    /// # Errors
    /// [`TopologyError`] naming the path when a required file (`possible`, `present`,
    /// `online`) cannot be read, or any file that exists does not parse. Files that vanish while
    /// being read (a CPU going offline) are not errors: that CPU simply has no [`CpuTopo`].
    pub fn read(&self) -> Result<Reading, TopologyError> {
        let masks = self.read_masks()?;
        let cpu_dir = self.sys.join("devices/system/cpu");
        let mut cpus = BTreeMap::new();
        for cpu in masks.online.iter() {
            if let Some(t) = read_cpu(&cpu_dir, cpu, &masks.nodes)? {
                cpus.insert(cpu, t);
            }
        }
        Ok(masks.into_reading(cpus))
    }

    /// Brings `reading` (an earlier [`read`](Self::read) or `rescan` of this reader's roots) up
    /// to date at a fraction of the cost of a full read: the masks, the nodes and the allowed
    /// CPUs are read again, but the per-CPU files (about 30 per CPU) only for
    ///
    /// 1. CPUs online now that `reading` has no [`CpuTopo`] for (new ones, and ones whose
    ///    folder was missing),
    /// 2. CPUs whose online state differs from `reading`'s, and the CPUs of `also` (a CPU that
    ///    went offline and came back between two reads looks unchanged in the masks; the
    ///    caller names it, as the uevent thread does, since its topology may differ),
    /// 3. the online CPUs that share a core, cluster, die, package or LLC with a CPU of 2 (as
    ///    `reading` saw it, and as it reads now): the kernel adds and removes a CPU in the
    ///    sibling lists of exactly those.
    ///
    /// Every other online CPU keeps its [`CpuTopo`] from `reading`. So the result equals a
    /// full read when every per-CPU file that changed since `reading` changed through the
    /// hotplug of a CPU of 2; a change of an online CPU's files without an online change (not
    /// something the kernel does on hotplug, but a firmware update or a hypervisor could) is
    /// seen only by the next full read, which [`crate::live::Monitor`] does at least every
    /// [`FULL_READ_EVERY`](crate::live::FULL_READ_EVERY).
    ///
    /// Returns the CPUs whose files were read (empty when nothing changed).
    ///
    /// # Errors
    /// As [`read`](Self::read); on error `reading` is unchanged.
    pub fn rescan(&self, reading: &mut Reading, also: &CpuSet) -> Result<CpuSet, TopologyError> {
        let masks = self.read_masks()?;
        let prev = &reading.0;
        let online = &masks.online;
        let toggled = prev
            .online
            .difference(online)
            .union(&online.difference(&prev.online));
        let seeds = toggled.union(also);
        let mut todo: CpuSet = online
            .iter()
            .filter(|c| !prev.cpus.contains_key(c))
            .collect();
        todo = todo.union(&seeds);
        for c in seeds.iter() {
            if let Some(t) = prev.cpus.get(&c) {
                todo = todo.union(&siblings(t));
            }
        }
        let todo = todo.intersection(online);

        let cpu_dir = self.sys.join("devices/system/cpu");
        let mut fresh = BTreeMap::new();
        for cpu in todo.iter() {
            fresh.insert(cpu, read_cpu(&cpu_dir, cpu, &masks.nodes)?);
        }
        // Siblings as the seeds read now: those that came online have none in `reading`.
        let mut more = CpuSet::new();
        for c in seeds.iter() {
            if let Some(Some(t)) = fresh.get(&c) {
                more = more.union(&siblings(t));
            }
        }
        let more = more.intersection(online).difference(&todo);
        for cpu in more.iter() {
            fresh.insert(cpu, read_cpu(&cpu_dir, cpu, &masks.nodes)?);
        }

        // Nothing failed: commit.
        let mut cpus = std::mem::take(&mut reading.0.cpus);
        cpus.retain(|c, _| online.contains(*c));
        for (cpu, t) in fresh {
            match t {
                Some(t) => cpus.insert(cpu, t),
                None => cpus.remove(&cpu),
            };
        }
        *reading = masks.into_reading(cpus);
        Ok(todo.union(&more))
    }

    /// The cheap part of a read: the masks, the nodes and the allowed CPUs (a few files plus
    /// one per node and, on a host, the cgroup files).
    fn read_masks(&self) -> Result<Masks, TopologyError> {
        let cpu_dir = self.sys.join("devices/system/cpu");
        let possible = read_list(&cpu_dir.join("possible"))?;
        let present = read_list(&cpu_dir.join("present"))?;
        let online = read_list(&cpu_dir.join("online"))?;
        let mut isolated = read_list_opt(&cpu_dir.join("isolated"))?.unwrap_or_default();
        if let Some(proc) = &self.proc {
            if let Some(cmdline) = read_opt(&proc.join("cmdline"))? {
                isolated = isolated.union(&cmdline_isolated(&cmdline));
            }
        }
        let nodes = self.read_nodes()?;
        let (allowed, allowed_source) = self.allowed(&online)?;
        Ok(Masks {
            possible,
            present,
            online,
            isolated,
            allowed,
            allowed_source,
            nodes,
        })
    }

    fn read_nodes(&self) -> Result<BTreeMap<u32, CpuSet>, TopologyError> {
        let dir = self.sys.join("devices/system/node");
        let mut nodes = BTreeMap::new();
        for (id, path) in numbered_entries(&dir, "node")? {
            if let Some(set) = read_list_opt(&path.join("cpulist"))? {
                nodes.insert(id, set);
            }
        }
        Ok(nodes)
    }

    fn allowed(&self, online: &CpuSet) -> Result<(CpuSet, AllowedSource), TopologyError> {
        let Some(proc) = &self.proc else {
            let cg = self.sys.join("fs/cgroup");
            let v1 = cg.join("cpuset/cpuset.effective_cpus");
            if let Some(set) = read_list_opt(&v1)? {
                return Ok((set, AllowedSource::CgroupV1));
            }
            if let Some(set) = read_list_opt(&cg.join("cpuset.cpus.effective"))? {
                return Ok((set, AllowedSource::CgroupV2));
            }
            return Ok((online.clone(), AllowedSource::AllOnline));
        };
        if let Some(found) = self.cgroup_cpuset(proc)? {
            return Ok(found);
        }
        Ok((affinity()?, AllowedSource::Affinity))
    }

    /// The process's cpuset from its cgroup, v1 first (on hybrid hosts the v2 hierarchy has no
    /// cpuset controller), then v2. `None` when neither yields a non-empty set.
    fn cgroup_cpuset(&self, proc: &Path) -> Result<Option<(CpuSet, AllowedSource)>, TopologyError> {
        let (Some(cgroup), Some(mountinfo)) = (
            read_opt(&proc.join("self/cgroup"))?,
            read_opt(&proc.join("self/mountinfo"))?,
        ) else {
            return Ok(None);
        };
        let entries = parse_proc_cgroup(&cgroup);
        let mounts = parse_mountinfo(&mountinfo);

        if let Some(entry) = entries.iter().find(|e| e.controllers.contains(&"cpuset")) {
            let v1 = mounts
                .iter()
                .filter(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "cpuset"));
            for m in v1 {
                let Some(rel) = relative_to_mount(&m.root, entry.path) else {
                    continue;
                };
                let dir = self.map_mount(&m.mount_point).join(rel);
                // `noprefix` mounts name the files without the `cpuset.` prefix.
                for name in [
                    "cpuset.effective_cpus",
                    "effective_cpus",
                    "cpuset.cpus",
                    "cpus",
                ] {
                    if let Some(set) = read_list_opt(&dir.join(name))? {
                        if !set.is_empty() {
                            return Ok(Some((set, AllowedSource::CgroupV1)));
                        }
                    }
                }
            }
        }

        if let Some(entry) = entries
            .iter()
            .find(|e| e.hierarchy == "0" && e.controllers.is_empty())
        {
            for m in mounts.iter().filter(|m| m.fstype == "cgroup2") {
                let Some(rel) = relative_to_mount(&m.root, entry.path) else {
                    continue;
                };
                let base = self.map_mount(&m.mount_point);
                let mut dir = base.join(rel);
                // The file exists only where the cpuset controller is enabled; the nearest
                // ancestor that has it bounds this cgroup.
                loop {
                    if let Some(set) = read_list_opt(&dir.join("cpuset.cpus.effective"))? {
                        if !set.is_empty() {
                            return Ok(Some((set, AllowedSource::CgroupV2)));
                        }
                    }
                    if dir == base || !dir.pop() {
                        break;
                    }
                }
            }
        }
        Ok(None)
    }

    /// Where a mount point from mountinfo is found under this reader's roots.
    fn map_mount(&self, mount_point: &str) -> PathBuf {
        if self.host {
            return PathBuf::from(mount_point);
        }
        let rel = match mount_point.strip_prefix("/sys") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => mount_point,
        };
        self.sys.join(rel.trim_start_matches('/'))
    }
}

/// Everything of a [`Reading`] but the per-CPU part.
struct Masks {
    possible: CpuSet,
    present: CpuSet,
    online: CpuSet,
    isolated: CpuSet,
    allowed: CpuSet,
    allowed_source: AllowedSource,
    nodes: BTreeMap<u32, CpuSet>,
}

impl Masks {
    fn into_reading(self, cpus: BTreeMap<u32, CpuTopo>) -> Reading {
        Reading(Topology {
            possible: self.possible,
            present: self.present,
            online: self.online,
            isolated: self.isolated,
            allowed: self.allowed,
            allowed_source: self.allowed_source,
            cpus,
            nodes: self.nodes,
        })
    }
}

/// The CPUs whose sibling lists name `t`'s CPU: its core, cluster, die, package and LLC.
fn siblings(t: &CpuTopo) -> CpuSet {
    let mut s = t.core_cpus.union(&t.package_cpus);
    for set in [&t.cluster_cpus, &t.die_cpus].into_iter().flatten() {
        s = s.union(set);
    }
    if let Some(llc) = &t.llc {
        s = s.union(&llc.cpus);
    }
    s
}

/// Reads one online CPU's `topology/`, `cache/` and node link under `cpu_dir`
/// (`devices/system/cpu`). `None` when the topology folder is absent, or vanished during the
/// read (the CPU went offline meanwhile).
fn read_cpu(
    cpu_dir: &Path,
    cpu: u32,
    nodes: &BTreeMap<u32, CpuSet>,
) -> Result<Option<CpuTopo>, TopologyError> {
    let dir = cpu_dir.join(format!("cpu{cpu}"));
    let topo = dir.join("topology");
    if !topo.is_dir() {
        tracing::debug!(cpu, "online CPU has no topology folder; skipped");
        return Ok(None);
    }
    let id = |name: &str| read_id_opt(&topo.join(name));
    let list = |name: &str| read_list_opt(&topo.join(name));
    let first_list = |a: &str, b: &str| -> Result<Option<CpuSet>, TopologyError> {
        Ok(match list(a)? {
            Some(s) => Some(s),
            None => list(b)?,
        })
    };
    let with_self = |s: Option<CpuSet>| {
        let mut s = s.unwrap_or_default();
        s.insert(cpu);
        s
    };
    let core_id = id("core_id")?;
    let core_cpus = with_self(first_list("core_cpus_list", "thread_siblings_list")?);
    let cluster_id = id("cluster_id")?;
    let cluster_cpus = list("cluster_cpus_list")?;
    let die_id = id("die_id")?;
    let die_cpus = list("die_cpus_list")?;
    let package_id = id("physical_package_id")?;
    let package_cpus = with_self(first_list("package_cpus_list", "core_siblings_list")?);
    let llc = read_llc(&dir.join("cache"))?;
    let node = match numbered_entries(&dir, "node")?.first() {
        Some((n, _)) => Some(*n),
        None => nodes
            .iter()
            .find(|(_, set)| set.contains(cpu))
            .map(|(n, _)| *n),
    };
    if !topo.is_dir() {
        // Went offline while we read: what we have may be partial.
        return Ok(None);
    }
    Ok(Some(CpuTopo {
        cpu,
        core_id,
        core_cpus,
        cluster_id,
        cluster_cpus,
        die_id,
        die_cpus,
        package_id,
        package_cpus,
        llc,
        node,
    }))
}

/// The last-level cache: of the `indexK` folders whose type is `Data` or `Unified`, the one
/// with the highest `level` (the lowest K among equals).
fn read_llc(cache: &Path) -> Result<Option<CacheInfo>, TopologyError> {
    let mut best: Option<CacheInfo> = None;
    for (_, dir) in numbered_entries(cache, "index")? {
        let Some(ty) = read_opt(&dir.join("type"))? else {
            continue;
        };
        if !matches!(ty.trim(), "Data" | "Unified") {
            continue;
        }
        let Some(level) = read_id_opt(&dir.join("level"))? else {
            continue;
        };
        let Some(cpus) = read_list_opt(&dir.join("shared_cpu_list"))? else {
            continue;
        };
        let level = u8::try_from(level).map_err(|_| TopologyError::Number {
            path: dir.join("level").display().to_string(),
            found: level.to_string(),
        })?;
        if best.as_ref().is_some_and(|b| b.level >= level) {
            continue;
        }
        let id = read_id_opt(&dir.join("id"))?;
        best = Some(CacheInfo { level, id, cpus });
    }
    Ok(best)
}

/// Entries `PREFIXn` of `dir` (files, folders or links) by ascending `n`; empty when `dir` is
/// absent.
fn numbered_entries(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>, TopologyError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix(prefix))
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

fn io_err(path: &Path, source: io::Error) -> TopologyError {
    TopologyError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn read_to_string(path: &Path) -> Result<String, TopologyError> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// The file's text, `None` when it (or its folder) does not exist.
fn read_opt(path: &Path) -> Result<Option<String>, TopologyError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

fn parse_list(path: &Path, text: &str) -> Result<CpuSet, TopologyError> {
    CpuSet::parse_list(text).map_err(|source| TopologyError::CpuList {
        path: path.display().to_string(),
        source,
    })
}

fn read_list(path: &Path) -> Result<CpuSet, TopologyError> {
    parse_list(path, &read_to_string(path)?)
}

fn read_list_opt(path: &Path) -> Result<Option<CpuSet>, TopologyError> {
    read_opt(path)?.map(|t| parse_list(path, &t)).transpose()
}

/// A sysfs id file. Negative values (`-1`: "not known", as `physical_package_id` or
/// `cluster_id` on some platforms) read as `None`, as does a missing file.
fn read_id_opt(path: &Path) -> Result<Option<u32>, TopologyError> {
    let Some(text) = read_opt(path)? else {
        return Ok(None);
    };
    let t = text.trim();
    match t.parse::<i64>() {
        Ok(n) if n < 0 => Ok(None),
        Ok(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| TopologyError::Number {
                path: path.display().to_string(),
                found: t.to_string(),
            }),
        Err(_) => Err(TopologyError::Number {
            path: path.display().to_string(),
            found: t.to_string(),
        }),
    }
}

/// CPUs the kernel command line keeps away from general scheduling: `isolcpus=` (with its
/// optional `nohz,`/`domain,`/`managed_irq,` flag prefix) and `nohz_full=`. Arguments after `--`
/// belong to init and are ignored; a list that does not parse is logged and ignored (the kernel
/// ignores it too).
fn cmdline_isolated(cmdline: &str) -> CpuSet {
    let mut out = CpuSet::new();
    for tok in cmdline.split_whitespace() {
        if tok == "--" {
            break;
        }
        let list = if let Some(v) = tok.strip_prefix("isolcpus=") {
            strip_isolcpus_flags(v)
        } else if let Some(v) = tok.strip_prefix("nohz_full=") {
            v
        } else {
            continue;
        };
        match CpuSet::parse_list(list) {
            Ok(set) => out = out.union(&set),
            Err(e) => {
                tracing::warn!(arg = tok, error = %e, "ignoring kernel command line argument")
            }
        }
    }
    out
}

/// `isolcpus=[flag,...,]list`: flags are words of letters and `_`; the list starts at the first
/// item beginning with a digit.
fn strip_isolcpus_flags(mut v: &str) -> &str {
    let is_flag =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_');
    loop {
        match v.split_once(',') {
            Some((head, rest)) if is_flag(head) => v = rest,
            None if is_flag(v) => return "",
            _ => return v,
        }
    }
}

/// One line of `/proc/self/cgroup`: `hierarchy-ID:controller-list:cgroup-path`.
struct CgroupEntry<'a> {
    hierarchy: &'a str,
    controllers: Vec<&'a str>,
    path: &'a str,
}

fn parse_proc_cgroup(text: &str) -> Vec<CgroupEntry<'_>> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let hierarchy = it.next()?;
            let controllers = it.next()?;
            let path = it.next()?;
            Some(CgroupEntry {
                hierarchy,
                controllers: controllers.split(',').filter(|c| !c.is_empty()).collect(),
                path,
            })
        })
        .collect()
}

/// The fields of a `/proc/self/mountinfo` line that locate a cgroup hierarchy.
struct Mount {
    /// Field 4: the folder of the filesystem mounted here (`/` unless a subtree is bind-mounted).
    root: String,
    /// Field 5, octal escapes decoded.
    mount_point: String,
    fstype: String,
    super_opts: String,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let root = fields.get(3)?;
            let mount_point = fields.get(4)?;
            let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            Some(Mount {
                root: unescape_mountinfo(root),
                mount_point: unescape_mountinfo(mount_point),
                fstype: fields.get(sep + 1)?.to_string(),
                super_opts: fields.get(sep + 3).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup `path` (from `/proc/self/cgroup`) relative to a mount whose root is `root`, or
/// `None` when the cgroup is outside what is mounted there (or the path escapes with `..`).
fn relative_to_mount(root: &str, path: &str) -> Option<PathBuf> {
    if path.split('/').any(|c| c == "..") {
        return None;
    }
    let rest = if root == "/" {
        path
    } else if path == root {
        ""
    } else {
        path.strip_prefix(root).filter(|r| r.starts_with('/'))?
    };
    Some(PathBuf::from(rest.trim_start_matches('/')))
}

/// The CPUs this process may run on: `sched_getaffinity(0)` with room for [`MAX_CPUS`] CPUs
/// (`nix`'s `CpuSet` stops at 1024). The one reading of the process's affinity: the
/// [`Reader`] falls back to it without a cpuset, the daemon asks it when deciding pinning.
///
/// # Errors
/// [`TopologyError::Io`] when the call fails.
pub fn affinity() -> Result<CpuSet, TopologyError> {
    let bits = libc::c_ulong::BITS;
    let mut words: Vec<libc::c_ulong> = vec![0; MAX_CPUS.div_ceil(bits) as usize];
    let bytes = std::mem::size_of_val(words.as_slice());
    // SAFETY: the kernel writes at most `bytes` bytes, which is exactly the length of `words`;
    // a cpu_set_t is an array of `unsigned long`, so the buffer's alignment matches.
    let rc =
        unsafe { libc::sched_getaffinity(0, bytes, words.as_mut_ptr().cast::<libc::cpu_set_t>()) };
    if rc != 0 {
        return Err(TopologyError::Io {
            path: "sched_getaffinity(0)".to_string(),
            source: io::Error::last_os_error(),
        });
    }
    let mut set = CpuSet::new();
    for (i, &w) in words.iter().enumerate() {
        for b in 0..bits {
            if w & (1 << b) != 0 {
                set.insert(i as u32 * bits + b);
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_flags_and_init_args() {
        let s = cmdline_isolated("ro isolcpus=domain,managed_irq,2-3,6 nohz_full=8 -- isolcpus=1");
        assert_eq!(s.to_string(), "2-3,6,8");
        assert_eq!(cmdline_isolated("isolcpus=nohz,4").to_string(), "4");
        assert_eq!(cmdline_isolated("isolcpus=5,7").to_string(), "5,7");
        assert!(cmdline_isolated("isolcpus=domain").is_empty());
        assert!(cmdline_isolated("quiet isolcpus=x-y").is_empty());
    }

    #[test]
    fn mountinfo_fields_and_escapes() {
        let m = parse_mountinfo(
            "34 31 0:31 /a\\040b /sys/fs/cgroup/cpu\\134set rw shared:9 master:2 - cgroup cgroup rw,cpuset\n",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].root, "/a b");
        assert_eq!(m[0].mount_point, "/sys/fs/cgroup/cpu\\set");
        assert_eq!(m[0].fstype, "cgroup");
        assert_eq!(m[0].super_opts, "rw,cpuset");
    }

    #[test]
    fn cgroup_paths_relative_to_mount_root() {
        assert_eq!(relative_to_mount("/", "/a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(relative_to_mount("/a", "/a/b"), Some(PathBuf::from("b")));
        assert_eq!(relative_to_mount("/a", "/a"), Some(PathBuf::from("")));
        assert_eq!(relative_to_mount("/a", "/ab/c"), None);
        assert_eq!(relative_to_mount("/", "/../x"), None);
    }

    #[test]
    fn proc_cgroup_lines() {
        let e = parse_proc_cgroup("3:cpuset,cpu:/x\n0::/y/z\n12:name=systemd:/\n");
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].controllers, vec!["cpuset", "cpu"]);
        assert!(e[1].controllers.is_empty());
        assert_eq!(e[1].path, "/y/z");
    }

    #[test]
    fn affinity_is_not_empty() {
        assert!(!affinity().unwrap().is_empty());
    }
}
