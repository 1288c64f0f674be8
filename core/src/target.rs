//! Targets: the names clients use for CPU groups, their grammar, and their canonical spelling.
//!
//! This module owns the *syntax* of a target only: it reads `cache:3` as "LLC number 3" without
//! knowing whether the machine has one; [`crate::groups`] says which CPUs a target names.
//!
//! Invariant: `Display` prints the canonical form and parsing it gives back an equal
//! [`Target`] (for every target the parser accepts), so two spellings of the same group
//! (`cpus:0-3` and ` cpus:0,1-3:1/1 `) map to one string, one queue key.
//!
//! # Grammar
//!
//! ```text
//! target  := ws* body ws*
//! body    := "all"
//!          | level ":" number          level := "cpu" | "core" | "cache" | "shard"
//!          | "cpus:" cpulist                    | "node" | "package"
//!          | name
//!          | name ":" number
//! number  := [0-9]+                    (decimal, leading zeros allowed, at most u32::MAX;
//!                                        CPU numbers of cpu:/core: below MAX_CPUS)
//! cpulist := the kernel cpulist grammar of crate::cpuset, non-empty, strides allowed
//! name    := [a-z][a-z0-9_-]*          and not a reserved word
//! reserved:= cpu core cache shard node package cpus all each
//!
//! item-target := target | ws* "each:" (level | name) ws*     (submitted items only)
//! ```
//!
//! `each:LEVEL` / `each:NAME` is a *fan-out* ([`Each`]): a submitted item that names it becomes
//! one item per group of the level, or per range of the partition NAME (see
//! [`crate::groups::GroupMap::each`]). It is not a group, so [`Target`]'s parser refuses it
//! ([`TargetError::FanOut`]); only [`ItemTarget`] — what a submitted item names — accepts it.
//!
//! Keywords and names are lowercase; `CPU:1` is an unknown level, not `cpu:1`. Any text
//! before the first `:` that is neither a keyword nor a valid name is an unknown level. A word
//! such as `cpu3` or `cpux` *is* a valid name, so it parses as a named group and fails only at
//! resolution (with a hint, see [`crate::groups::GroupError::UnknownName`]).
//!
//! Error offsets are byte offsets into the original input, leading white space included.

use std::fmt;
use std::str::FromStr;

use crate::cpuset::{CpuListError, CpuSet, MAX_CPUS};

/// The words a group name may not be.
pub const RESERVED: [&str; 9] = [
    "cpu", "core", "cache", "shard", "node", "package", "cpus", "all", "each",
];

/// What any target may look like; quoted by errors that cannot be more specific.
const EXPECTED_FORMS: &str = "cpu, core, cache, shard, node, package (each as WORD:N), \
                              cpus:LIST, all, or a lowercase group name (NAME or NAME:N)";

/// A level keyword that takes a number: how to build the target and how errors name the number.
struct Numbered {
    word: &'static str,
    make: fn(u32) -> Target,
    what: &'static str,
    what_with_colon: &'static str,
    max: u64,
}

const CPU_MAX: u64 = MAX_CPUS as u64 - 1;
const U32_MAX: u64 = u32::MAX as u64;

const NUMBERED: [Numbered; 6] = [
    Numbered {
        word: "cpu",
        make: Target::Cpu,
        what: "a CPU number",
        what_with_colon: "\":\" and a CPU number",
        max: CPU_MAX,
    },
    Numbered {
        word: "core",
        make: Target::Core,
        what: "a CPU number",
        what_with_colon: "\":\" and a CPU number",
        max: CPU_MAX,
    },
    Numbered {
        word: "cache",
        make: Target::Cache,
        what: "an LLC number",
        what_with_colon: "\":\" and an LLC number",
        max: U32_MAX,
    },
    Numbered {
        word: "shard",
        make: Target::Shard,
        what: "a shard number",
        what_with_colon: "\":\" and a shard number",
        max: U32_MAX,
    },
    Numbered {
        word: "node",
        make: Target::Node,
        what: "a node number",
        what_with_colon: "\":\" and a node number",
        max: U32_MAX,
    },
    Numbered {
        word: "package",
        make: Target::Package,
        what: "a package number",
        what_with_colon: "\":\" and a package number",
        max: U32_MAX,
    },
];

/// A parsed target. `Display` prints the canonical form (`cpus:` lists in canonical cpulist
/// form), so two spellings of the same group map to the same queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// `cpu:N`
    Cpu(u32),
    /// `core:N` — the SMT siblings of CPU N.
    Core(u32),
    /// `cache:N` — last-level cache N (numbering: see [`crate::groups`]).
    Cache(u32),
    /// `shard:N` — slice N of an LLC.
    Shard(u32),
    /// `node:N` — NUMA node N.
    Node(u32),
    /// `package:N` — physical package N.
    Package(u32),
    /// `cpus:LIST` — any cpulist.
    Cpus(CpuSet),
    /// `NAME` — a named group from config.
    Named(String),
    /// `NAME:N` — range N of a named partition from config.
    Partition { name: String, index: u32 },
    /// `all`
    All,
}

/// What `each:` fans out over: every group of a level, or every range of a partition.
/// `Display` prints the canonical form (`each:cache`, `each:rcu`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Each {
    /// `each:cpu` — every possible or known CPU.
    Cpu,
    /// `each:core` — every core.
    Core,
    /// `each:shard` — every shard.
    Shard,
    /// `each:cache` — every LLC.
    Cache,
    /// `each:node` — every NUMA node.
    Node,
    /// `each:package` — every package.
    Package,
    /// `each:NAME` — every range of the partition NAME.
    Partition(String),
}

/// The levels `each:` accepts, as they are spelled.
const EACH_LEVELS: [(&str, Each); 6] = [
    ("cpu", Each::Cpu),
    ("core", Each::Core),
    ("shard", Each::Shard),
    ("cache", Each::Cache),
    ("node", Each::Node),
    ("package", Each::Package),
];

/// What may follow `each:`; quoted by its errors.
const EACH_EXPECTED: &str = "a level (cpu, core, shard, cache, node, package) or a partition name";

impl fmt::Display for Each {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            Each::Partition(name) => name.as_str(),
            level => EACH_LEVELS
                .iter()
                .find(|(_, l)| l == level)
                .map_or("?", |(w, _)| w),
        };
        write!(f, "each:{word}")
    }
}

impl FromStr for Each {
    type Err = TargetError;

    /// Parses `each:LEVEL` or `each:NAME` (white space around it is ignored).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let lead = input.len() - input.trim_start().len();
        let body = input.trim();
        let Some(rest) = body.strip_prefix("each") else {
            return Err(TargetError::UnknownLevel {
                at: lead,
                found: body.split(':').next().unwrap_or_default().to_string(),
            });
        };
        let Some(arg) = rest.strip_prefix(':') else {
            return Err(TargetError::Expected {
                at: lead + 4,
                what: "\":\" and a level or a partition name",
                after: "each".to_string(),
                found: rest.to_string(),
            });
        };
        let at = lead + 5;
        let (word, extra) = match arg.find(':') {
            Some(i) => (&arg[..i], Some(&arg[i..])),
            None => (arg, None),
        };
        let refuse = |why: &'static str| TargetError::NotFanOut {
            at,
            found: arg.to_string(),
            why,
        };
        match word {
            "" => {
                return Err(TargetError::Expected {
                    at,
                    what: EACH_EXPECTED,
                    after: "each:".to_string(),
                    found: arg.to_string(),
                })
            }
            "all" => return Err(refuse("\"all\" is one group; submit to all")),
            "cpus" => {
                return Err(refuse(
                    "a cpulist is one group; submit to cpus:LIST, or use a partition",
                ))
            }
            "each" => return Err(refuse("fan-outs do not nest")),
            _ => {}
        }
        if let Some(extra) = extra {
            return Err(TargetError::Expected {
                at: at + word.len(),
                what: "the end of the target (each: takes no index)",
                after: format!("each:{word}"),
                found: extra.to_string(),
            });
        }
        if let Some((_, l)) = EACH_LEVELS.iter().find(|(w, _)| *w == word) {
            return Ok(l.clone());
        }
        match check_name(word) {
            Ok(()) => Ok(Each::Partition(word.to_string())),
            Err(_) => Err(TargetError::Expected {
                at,
                what: EACH_EXPECTED,
                after: "each:".to_string(),
                found: arg.to_string(),
            }),
        }
    }
}

/// What a submitted item names: one group, or a fan-out over groups.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ItemTarget {
    One(Target),
    Each(Each),
}

impl FromStr for ItemTarget {
    type Err = TargetError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if is_fan_out(input) {
            input.parse().map(ItemTarget::Each)
        } else {
            input.parse().map(ItemTarget::One)
        }
    }
}

impl fmt::Display for ItemTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ItemTarget::One(t) => t.fmt(f),
            ItemTarget::Each(e) => e.fmt(f),
        }
    }
}

/// True when `input` is spelled as a fan-out: `each` (or `each:...`) after white space.
fn is_fan_out(input: &str) -> bool {
    let body = input.trim_start();
    body.strip_prefix("each")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(':') || rest.trim().is_empty())
}

/// Why a target (or a group name from config) did not parse. Every message says what was
/// expected and at which byte of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Nothing but white space.
    #[error("empty target; expected one of {}", EXPECTED_FORMS)]
    Empty,
    /// The text before the first `:` is neither a keyword nor a valid group name.
    #[error(
        "unknown level {} at byte {at}; expected one of {}",
        crate::quote::quote(.found),
        EXPECTED_FORMS
    )]
    UnknownLevel { at: usize, found: String },
    /// The argument after a keyword or name is missing or malformed.
    #[error("at byte {at}: expected {what} after {}, found {}", crate::quote::quote(.after), show_found(.found))]
    Expected {
        at: usize,
        /// E.g. `a CPU number`, `":" and a cpulist`.
        what: &'static str,
        /// The text the argument follows, e.g. `cpu:`.
        after: String,
        /// The offending text; empty means end of input.
        found: String,
    },
    /// A number that does not fit.
    #[error("at byte {at}: {what} {} after {} is too large (at most {max})", crate::quote::prefix(.found), crate::quote::quote(.after))]
    TooLarge {
        at: usize,
        what: &'static str,
        after: String,
        found: String,
        max: u64,
    },
    /// `all` followed by an argument.
    #[error("at byte {at}: {keyword:?} takes no argument, found {}", crate::quote::quote(.found))]
    UnexpectedArgument {
        at: usize,
        keyword: &'static str,
        found: String,
    },
    /// The cpulist after `cpus:` did not parse; `error`'s offset is already shifted to count
    /// from the start of the whole target.
    #[error("{error} (in the cpulist after \"cpus:\")")]
    CpuList { error: CpuListError },
    /// A group name (from config, or built in code) with a character outside `[a-z0-9_-]`, or
    /// not starting with `[a-z]`.
    #[error("at byte {at} of group name {}: expected {}, found {found:?}", crate::quote::quote(.name),
        if *.at == 0 { "a lowercase letter a-z" } else { "a-z, 0-9, '_' or '-'" })]
    BadName {
        name: String,
        at: usize,
        found: char,
    },
    /// An empty group name.
    #[error("empty group name; expected [a-z][a-z0-9_-]*")]
    EmptyName,
    /// `each:` followed by something that names one group, not groups to fan out over.
    #[error("at byte {at}: each: takes {EACH_EXPECTED}, found {}; {why}", crate::quote::quote(.found))]
    NotFanOut {
        at: usize,
        found: String,
        why: &'static str,
    },
    /// A fan-out (`each:...`) where one group is required (config, workqueue defaults, ...).
    #[error("{} fans out to one item per group and is accepted only as the target of a submitted item; name one group here", crate::quote::quote(.found))]
    FanOut { found: String },
    /// A group name that is a keyword of the grammar.
    #[error("group name {} is reserved; expected a name other than {}", crate::quote::quote(.name), RESERVED.join(", "))]
    ReservedName { name: String },
}

fn show_found(found: &str) -> String {
    if found.is_empty() {
        "end of input".to_string()
    } else {
        crate::quote::quote(found)
    }
}

/// Checks that `name` may name a group: `[a-z][a-z0-9_-]*`, not a [`RESERVED`] word.
///
/// # Errors
/// [`TargetError::EmptyName`], [`TargetError::BadName`] (offset within `name`) or
/// [`TargetError::ReservedName`].
pub fn check_name(name: &str) -> Result<(), TargetError> {
    let mut chars = name.char_indices();
    let Some((_, first)) = chars.next() else {
        return Err(TargetError::EmptyName);
    };
    if !first.is_ascii_lowercase() {
        return Err(TargetError::BadName {
            name: name.to_string(),
            at: 0,
            found: first,
        });
    }
    for (at, c) in chars {
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') {
            return Err(TargetError::BadName {
                name: name.to_string(),
                at,
                found: c,
            });
        }
    }
    if RESERVED.contains(&name) {
        return Err(TargetError::ReservedName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Parses the decimal number `s` found at byte `at`, after the text `after`.
fn number(
    s: &str,
    at: usize,
    what: &'static str,
    after: String,
    max: u64,
) -> Result<u32, TargetError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::Expected {
            at,
            what,
            after,
            found: s.to_string(),
        });
    }
    match s.parse::<u64>() {
        Ok(n) if n <= max => u32::try_from(n).map_err(|_| TargetError::TooLarge {
            at,
            what,
            after: after.clone(),
            found: s.to_string(),
            max,
        }),
        _ => Err(TargetError::TooLarge {
            at,
            what,
            after,
            found: s.to_string(),
            max,
        }),
    }
}

/// The cpulist error `e`, with its offset moved by `by` bytes.
fn shift(e: CpuListError, by: usize) -> CpuListError {
    match e {
        CpuListError::ExpectedNumber { at, found } => {
            CpuListError::ExpectedNumber { at: at + by, found }
        }
        CpuListError::TooLarge { at, cpu } => CpuListError::TooLarge { at: at + by, cpu },
        CpuListError::Backwards { at, lo, hi } => CpuListError::Backwards {
            at: at + by,
            lo,
            hi,
        },
        CpuListError::BadStride { at, used, group } => CpuListError::BadStride {
            at: at + by,
            used,
            group,
        },
    }
}

impl Target {
    /// A named-group target, checking the name.
    ///
    /// # Errors
    /// As [`check_name`].
    pub fn named(name: &str) -> Result<Target, TargetError> {
        check_name(name)?;
        Ok(Target::Named(name.to_string()))
    }

    /// A partition-range target, checking the name.
    ///
    /// # Errors
    /// As [`check_name`].
    pub fn partition(name: &str, index: u32) -> Result<Target, TargetError> {
        check_name(name)?;
        Ok(Target::Partition {
            name: name.to_string(),
            index,
        })
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let lead = input.len() - input.trim_start().len();
        let body = input.trim();
        if body.is_empty() {
            return Err(TargetError::Empty);
        }
        if is_fan_out(input) {
            return Err(TargetError::FanOut {
                found: body.to_string(),
            });
        }
        // `arg` is the text after the first ':' and its byte offset in `input`.
        let (head, arg) = match body.find(':') {
            Some(i) => (&body[..i], Some((&body[i + 1..], lead + i + 1))),
            None => (body, None),
        };
        let head_end = lead + head.len();
        if let Some(kw) = NUMBERED.iter().find(|k| k.word == head) {
            let Some((a, at)) = arg else {
                return Err(TargetError::Expected {
                    at: head_end,
                    what: kw.what_with_colon,
                    after: head.to_string(),
                    found: String::new(),
                });
            };
            return number(a, at, kw.what, format!("{head}:"), kw.max).map(kw.make);
        }
        match (head, arg) {
            ("all", None) => Ok(Target::All),
            ("all", Some((a, at))) => Err(TargetError::UnexpectedArgument {
                at: at - 1,
                keyword: "all",
                found: format!(":{a}"),
            }),
            ("cpus", None) => Err(TargetError::Expected {
                at: head_end,
                what: "\":\" and a cpulist",
                after: "cpus".to_string(),
                found: String::new(),
            }),
            ("cpus", Some((a, at))) => {
                if a.trim().is_empty() {
                    return Err(TargetError::Expected {
                        at,
                        what: "a cpulist",
                        after: "cpus:".to_string(),
                        found: a.to_string(),
                    });
                }
                CpuSet::parse_list(a)
                    .map(Target::Cpus)
                    .map_err(|e| TargetError::CpuList {
                        error: shift(e, at),
                    })
            }
            (name, arg) => {
                if check_name(name).is_err() {
                    return Err(TargetError::UnknownLevel {
                        at: lead,
                        found: name.to_string(),
                    });
                }
                match arg {
                    None => Ok(Target::Named(name.to_string())),
                    Some((a, at)) => {
                        let index = number(
                            a,
                            at,
                            "a partition index",
                            format!("{name}:"),
                            u64::from(u32::MAX),
                        )?;
                        Ok(Target::Partition {
                            name: name.to_string(),
                            index,
                        })
                    }
                }
            }
        }
    }
}

impl fmt::Display for Target {
    /// The canonical form: lowercase keyword, decimal number without leading zeros, `cpus:`
    /// lists in the kernel's canonical cpulist form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cpu(n) => write!(f, "cpu:{n}"),
            Target::Core(n) => write!(f, "core:{n}"),
            Target::Cache(n) => write!(f, "cache:{n}"),
            Target::Shard(n) => write!(f, "shard:{n}"),
            Target::Node(n) => write!(f, "node:{n}"),
            Target::Package(n) => write!(f, "package:{n}"),
            Target::Cpus(set) => write!(f, "cpus:{set}"),
            Target::Named(name) => f.write_str(name),
            Target::Partition { name, index } => write!(f, "{name}:{index}"),
            Target::All => f.write_str("all"),
        }
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<Target>().unwrap_err().to_string()
    }

    #[test]
    fn parses_every_form() {
        let cases: &[(&str, Target)] = &[
            ("cpu:3", Target::Cpu(3)),
            (" core:007\n", Target::Core(7)),
            ("cache:1", Target::Cache(1)),
            ("shard:12", Target::Shard(12)),
            ("node:0", Target::Node(0)),
            ("package:1", Target::Package(1)),
            ("cpus:0-15", Target::Cpus(CpuSet::range(0, 15))),
            ("all", Target::All),
            ("rcu", Target::Named("rcu".into())),
            (
                "rcu:3",
                Target::Partition {
                    name: "rcu".into(),
                    index: 3,
                },
            ),
            ("cpu3", Target::Named("cpu3".into())),
            ("db_io-2", Target::Named("db_io-2".into())),
        ];
        for (s, t) in cases {
            assert_eq!(s.parse::<Target>().unwrap(), *t, "{s}");
        }
    }

    #[test]
    fn display_is_canonical() {
        let t: Target = "  cpus:0-7:2/4,3 ".parse().unwrap();
        assert_eq!(t.to_string(), "cpus:0-1,3-5");
        assert_eq!("core:007".parse::<Target>().unwrap().to_string(), "core:7");
        assert_eq!("rcu:03".parse::<Target>().unwrap().to_string(), "rcu:3");
    }

    #[test]
    fn empty() {
        assert_eq!(
            err("  \n"),
            "empty target; expected one of cpu, core, cache, shard, node, package (each as \
             WORD:N), cpus:LIST, all, or a lowercase group name (NAME or NAME:N)"
        );
    }

    #[test]
    fn unknown_level() {
        assert_eq!(
            err("CPU:1"),
            "unknown level \"CPU\" at byte 0; expected one of cpu, core, cache, shard, node, \
             package (each as WORD:N), cpus:LIST, all, or a lowercase group name (NAME or NAME:N)"
        );
        assert!(err("  9:1").starts_with("unknown level \"9\" at byte 2;"));
        assert!(err("cpu x").starts_with("unknown level \"cpu x\" at byte 0;"));
    }

    #[test]
    fn expected_number() {
        assert_eq!(
            err("cpu:x"),
            "at byte 4: expected a CPU number after \"cpu:\", found \"x\""
        );
        assert_eq!(
            err(" core:"),
            "at byte 6: expected a CPU number after \"core:\", found end of input"
        );
        assert_eq!(
            err("cache:-1"),
            "at byte 6: expected an LLC number after \"cache:\", found \"-1\""
        );
        assert_eq!(
            err("shard:1.5"),
            "at byte 6: expected a shard number after \"shard:\", found \"1.5\""
        );
        assert_eq!(
            err("node: 1"),
            "at byte 5: expected a node number after \"node:\", found \" 1\""
        );
        assert_eq!(
            err("package:a"),
            "at byte 8: expected a package number after \"package:\", found \"a\""
        );
        assert_eq!(
            err("rcu:3:4"),
            "at byte 4: expected a partition index after \"rcu:\", found \"3:4\""
        );
    }

    #[test]
    fn missing_colon() {
        assert_eq!(
            err("cpu"),
            "at byte 3: expected \":\" and a CPU number after \"cpu\", found end of input"
        );
        assert_eq!(
            err("node"),
            "at byte 4: expected \":\" and a node number after \"node\", found end of input"
        );
        assert_eq!(
            err(" cpus"),
            "at byte 5: expected \":\" and a cpulist after \"cpus\", found end of input"
        );
    }

    #[test]
    fn too_large() {
        assert_eq!(
            err("cpu:8192"),
            "at byte 4: a CPU number 8192 after \"cpu:\" is too large (at most 8191)"
        );
        assert_eq!(
            err("node:4294967296"),
            "at byte 5: a node number 4294967296 after \"node:\" is too large (at most 4294967295)"
        );
        assert_eq!(
            err("rcu:99999999999999999999999"),
            "at byte 4: a partition index 99999999999999999999999 after \"rcu:\" is too large \
             (at most 4294967295)"
        );
    }

    #[test]
    fn all_takes_no_argument() {
        assert_eq!(
            err("all:0"),
            "at byte 3: \"all\" takes no argument, found \":0\""
        );
    }

    #[test]
    fn cpulist_errors_are_shifted() {
        assert_eq!(
            err("cpus:"),
            "at byte 5: expected a cpulist after \"cpus:\", found end of input"
        );
        assert_eq!(
            err("cpus:\t"),
            "at byte 5: expected a cpulist after \"cpus:\", found end of input"
        );
        assert_eq!(
            err("  cpus:0-3,x"),
            "at byte 11: expected a CPU number, found \"x\" (in the cpulist after \"cpus:\")"
        );
        assert_eq!(
            err("cpus:5-2"),
            "at byte 5: range 5-2 runs backwards (in the cpulist after \"cpus:\")"
        );
        assert_eq!(
            err("cpus:0-7:3/2"),
            "at byte 9: stride 3/2 needs 1 <= used <= group (in the cpulist after \"cpus:\")"
        );
        assert_eq!(
            err("cpus:0-99999"),
            "at byte 7: CPU 99999 is too large (at most 8191) (in the cpulist after \"cpus:\")"
        );
    }

    #[test]
    fn name_errors() {
        assert_eq!(check_name(""), Err(TargetError::EmptyName));
        assert_eq!(
            check_name("").unwrap_err().to_string(),
            "empty group name; expected [a-z][a-z0-9_-]*"
        );
        assert_eq!(
            check_name("Rcu").unwrap_err().to_string(),
            "at byte 0 of group name \"Rcu\": expected a lowercase letter a-z, found 'R'"
        );
        assert_eq!(
            check_name("rc.u").unwrap_err().to_string(),
            "at byte 2 of group name \"rc.u\": expected a-z, 0-9, '_' or '-', found '.'"
        );
        assert_eq!(
            check_name("cpus").unwrap_err().to_string(),
            "group name \"cpus\" is reserved; expected a name other than cpu, core, cache, \
             shard, node, package, cpus, all, each"
        );
        assert!(Target::named("all").is_err());
        assert_eq!(Target::partition("rcu", 2).unwrap().to_string(), "rcu:2");
    }

    #[test]
    fn fan_outs_parse_and_print_canonically() {
        let cases: &[(&str, Each, &str)] = &[
            ("each:cpu", Each::Cpu, "each:cpu"),
            (" each:core\n", Each::Core, "each:core"),
            ("each:shard", Each::Shard, "each:shard"),
            ("each:cache", Each::Cache, "each:cache"),
            ("each:node", Each::Node, "each:node"),
            ("each:package", Each::Package, "each:package"),
            ("each:rcu", Each::Partition("rcu".into()), "each:rcu"),
            ("each:cpu3", Each::Partition("cpu3".into()), "each:cpu3"),
        ];
        for (s, e, canon) in cases {
            assert_eq!(s.parse::<Each>().unwrap(), *e, "{s}");
            assert_eq!(e.to_string(), *canon);
            assert_eq!(canon.parse::<Each>().unwrap(), *e, "round trip of {canon}");
            assert_eq!(
                s.parse::<ItemTarget>().unwrap(),
                ItemTarget::Each(e.clone())
            );
        }
        // Plain targets are still plain, including names that start with "each".
        assert_eq!(
            "cache:1".parse::<ItemTarget>().unwrap(),
            ItemTarget::One(Target::Cache(1))
        );
        assert_eq!(
            "eachx".parse::<ItemTarget>().unwrap(),
            ItemTarget::One(Target::Named("eachx".into()))
        );
        assert_eq!(
            "each_1:2".parse::<ItemTarget>().unwrap().to_string(),
            "each_1:2"
        );
    }

    #[test]
    fn fan_out_refusals() {
        let e = |s: &str| s.parse::<ItemTarget>().unwrap_err().to_string();
        assert_eq!(
            e("each:all"),
            "at byte 5: each: takes a level (cpu, core, shard, cache, node, package) or a \
             partition name, found \"all\"; \"all\" is one group; submit to all"
        );
        assert!(
            e("each:cpus:0-3").starts_with("at byte 5: each: takes a level")
                && e("each:cpus:0-3").contains("a cpulist is one group"),
            "{}",
            e("each:cpus:0-3")
        );
        assert!(e("each:each").contains("fan-outs do not nest"));
        assert_eq!(
            e("each"),
            "at byte 4: expected \":\" and a level or a partition name after \"each\", found \
             end of input"
        );
        assert_eq!(
            e(" each:"),
            "at byte 6: expected a level (cpu, core, shard, cache, node, package) or a \
             partition name after \"each:\", found end of input"
        );
        assert_eq!(
            e("each:cache:3"),
            "at byte 10: expected the end of the target (each: takes no index) after \
             \"each:cache\", found \":3\""
        );
        assert!(e("each:Cache").starts_with("at byte 5: expected a level"));
        assert!(e("each:rcu x").starts_with("at byte 5: expected a level"));
        // A fan-out is not a group: where one group is required, it is refused.
        assert_eq!(
            err("each:cache"),
            "\"each:cache\" fans out to one item per group and is accepted only as the target \
             of a submitted item; name one group here"
        );
        assert_eq!(
            check_name("each").unwrap_err().to_string(),
            "group name \"each\" is reserved; expected a name other than cpu, core, cache, \
             shard, node, package, cpus, all, each"
        );
    }

    #[test]
    fn serde_as_string() {
        use serde::de::IntoDeserializer;
        use serde::Deserialize;
        let d: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            " cpus:3,0-2 ".into_deserializer();
        assert_eq!(
            Target::deserialize(d).unwrap(),
            Target::Cpus(CpuSet::range(0, 3))
        );
        let d: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            "cpu:x".into_deserializer();
        assert_eq!(
            Target::deserialize(d).unwrap_err().to_string(),
            "at byte 4: expected a CPU number after \"cpu:\", found \"x\""
        );
    }
}
