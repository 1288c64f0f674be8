//! CPU sets and the kernel's cpulist grammar.
//!
//! [`CpuSet`] is a plain growable bitmap of logical CPU numbers. It owns one invariant: the
//! word vector never ends in a zero word, so two sets with the same members are equal (and
//! hash equal) whatever operations produced them.
//!
//! # The cpulist grammar (as `bitmap_parselist()` in the kernel's `lib/bitmap-str.c`)
//!
//! ```text
//! list   := "" | item ("," item)*
//! item   := N | N "-" M | N "-" M ":" used "/" group
//! ```
//!
//! `N-M:used/group` selects, in the range `N..=M`, the first `used` CPUs of every block of
//! `group` CPUs counted from `N`: `0-1023:2/256` is `0-1,256-257,512-513,768-769`. Ranges must
//! not run backwards, `used` must be at least 1 and at most `group`. White space around the
//! whole list (sysfs files end in a newline) is ignored; an empty list is the empty set.
//! Formatting produces the kernel's canonical form: ascending, ranges merged, no strides.

use std::fmt;
use std::str::FromStr;

/// The highest CPU number (exclusive) a set may hold. The kernel's largest `NR_CPUS` is 8192;
/// the bound keeps hostile input such as `cpus:0-4000000000` from allocating gigabytes.
pub const MAX_CPUS: u32 = 8192;

/// A set of logical CPU numbers below [`MAX_CPUS`].
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CpuSet {
    /// Bit `c % 64` of word `c / 64` is set when CPU `c` is a member. No trailing zero word.
    words: Vec<u64>,
}

/// Why a cpulist did not parse. `at` is the byte offset of the offending item in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    #[error("at byte {at}: expected a CPU number, found {}", crate::quote::quote(.found))]
    ExpectedNumber { at: usize, found: String },
    #[error("at byte {at}: CPU {cpu} is too large (at most {max})", max = MAX_CPUS - 1)]
    TooLarge { at: usize, cpu: u64 },
    #[error("at byte {at}: range {lo}-{hi} runs backwards")]
    Backwards { at: usize, lo: u32, hi: u32 },
    #[error("at byte {at}: stride {used}/{group} needs 1 <= used <= group")]
    BadStride { at: usize, used: u32, group: u32 },
}

impl CpuSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding only `cpu`.
    pub fn single(cpu: u32) -> Self {
        let mut s = Self::new();
        s.insert(cpu);
        s
    }

    /// The CPUs `lo..=hi` (empty when `lo > hi`).
    pub fn range(lo: u32, hi: u32) -> Self {
        let mut s = Self::new();
        for c in lo..=hi.min(MAX_CPUS - 1) {
            s.insert(c);
        }
        s
    }

    /// Adds `cpu`; returns whether it was absent. CPUs at or above [`MAX_CPUS`] are ignored.
    pub fn insert(&mut self, cpu: u32) -> bool {
        if cpu >= MAX_CPUS {
            return false;
        }
        let (w, b) = ((cpu / 64) as usize, cpu % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        !was
    }

    /// Removes `cpu`; returns whether it was present.
    pub fn remove(&mut self, cpu: u32) -> bool {
        let (w, b) = ((cpu / 64) as usize, cpu % 64);
        let Some(word) = self.words.get_mut(w) else {
            return false;
        };
        let was = *word & (1 << b) != 0;
        *word &= !(1 << b);
        self.trim();
        was
    }

    /// Whether `cpu` is a member.
    pub fn contains(&self, cpu: u32) -> bool {
        let (w, b) = ((cpu / 64) as usize, cpu % 64);
        self.words.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set has no member.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The lowest member.
    pub fn first(&self) -> Option<u32> {
        self.words
            .iter()
            .enumerate()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| i as u32 * 64 + w.trailing_zeros())
    }

    /// The highest member.
    pub fn last(&self) -> Option<u32> {
        let i = self.words.len().checked_sub(1)?;
        Some(i as u32 * 64 + 63 - self.words[i].leading_zeros())
    }

    /// Members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(i as u32 * 64 + b)
            })
        })
    }

    /// The `n`-th member in ascending order (0-based).
    pub fn nth(&self, n: usize) -> Option<u32> {
        self.iter().nth(n)
    }

    /// Members of either set.
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        let (long, short) = if self.words.len() >= other.words.len() {
            (self, other)
        } else {
            (other, self)
        };
        let mut words = long.words.clone();
        for (w, o) in words.iter_mut().zip(&short.words) {
            *w |= o;
        }
        CpuSet { words }
    }

    /// Members of both sets.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        let words = self
            .words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| a & b)
            .collect();
        let mut s = CpuSet { words };
        s.trim();
        s
    }

    /// Members of both sets that are at least `floor`: `self ∩ other` minus the CPUs below
    /// `floor`, reading only the words from `floor / 64` on and allocating only when the
    /// result is not empty. With `floor` at or below `self`'s lowest member it equals
    /// [`intersection`](Self::intersection), at a cost that depends on the span of `self`, not
    /// on how high its CPU numbers are (what [`crate::groups`] uses to widen in flat time).
    #[inline]
    pub fn intersection_from(&self, other: &CpuSet, floor: u32) -> CpuSet {
        let lo = (floor / 64) as usize;
        let n = self.words.len().min(other.words.len());
        if lo >= n {
            return CpuSet::new();
        }
        let mask = !0u64 << (floor % 64);
        if lo == 0 {
            // Nothing to skip: the plain intersection is the fastest way to build the words
            // (the check first keeps a miss from allocating).
            if !self.intersects(other) {
                return CpuSet::new();
            }
            let mut s = self.intersection(other);
            // Not empty, so it has a first word. Only a `floor` above `self`'s lowest member
            // has bits to clear.
            if self.words[0] & !mask != 0 {
                s.words[0] &= mask;
                s.trim();
            }
            return s;
        }
        let (a, b) = (&self.words[lo..n], &other.words[lo..n]);
        // The highest word of the result, relative to `lo`; nothing is allocated without one.
        let top = match a.iter().zip(b).rposition(|(x, y)| x & y != 0) {
            Some(0) if a[0] & b[0] & mask == 0 => return CpuSet::new(),
            Some(top) => top,
            None => return CpuSet::new(),
        };
        let mut words = Vec::with_capacity(lo + top + 1);
        words.extend(std::iter::repeat_n(0, lo));
        words.extend(a[..=top].iter().zip(&b[..=top]).map(|(x, y)| x & y));
        words[lo] &= mask;
        CpuSet { words }
    }

    /// Members of `self` that are not in `other`.
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        let mut words = self.words.clone();
        for (w, o) in words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
        let mut s = CpuSet { words };
        s.trim();
        s
    }

    /// Whether the sets share a member.
    pub fn intersects(&self, other: &CpuSet) -> bool {
        self.words.iter().zip(&other.words).any(|(a, b)| a & b != 0)
    }

    /// Whether every member of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.words
            .iter()
            .enumerate()
            .all(|(i, w)| w & !other.words.get(i).copied().unwrap_or(0) == 0)
    }

    /// Parses a kernel cpulist (see the module docs for the grammar).
    ///
    /// # Errors
    /// [`CpuListError`] names the byte offset of the first bad item and what was expected.
    pub fn parse_list(input: &str) -> Result<CpuSet, CpuListError> {
        let mut set = CpuSet::new();
        let lead = input.len() - input.trim_start().len();
        let body = input.trim();
        if body.is_empty() {
            return Ok(set);
        }
        let mut at = lead;
        for item in body.split(',') {
            parse_item(item, at, &mut set)?;
            at += item.len() + 1;
        }
        Ok(set)
    }

    fn trim(&mut self) {
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
    }
}

fn parse_num(s: &str, at: usize) -> Result<u32, CpuListError> {
    let t = s.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CpuListError::ExpectedNumber {
            at,
            found: s.to_string(),
        });
    }
    let n: u64 = t.parse().unwrap_or(u64::MAX);
    if n >= u64::from(MAX_CPUS) {
        return Err(CpuListError::TooLarge { at, cpu: n });
    }
    Ok(n as u32)
}

fn parse_item(item: &str, at: usize, set: &mut CpuSet) -> Result<(), CpuListError> {
    let (range, stride) = match item.split_once(':') {
        Some((r, s)) => (r, Some(s)),
        None => (item, None),
    };
    let (lo, hi) = match range.split_once('-') {
        Some((a, b)) => (parse_num(a, at)?, parse_num(b, at + a.len() + 1)?),
        None => {
            let n = parse_num(range, at)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(CpuListError::Backwards { at, lo, hi });
    }
    let (used, group) = match stride {
        None => (hi - lo + 1, hi - lo + 1),
        Some(s) => {
            let sat = at + range.len() + 1;
            let Some((u, g)) = s.split_once('/') else {
                return Err(CpuListError::ExpectedNumber {
                    at: sat,
                    found: s.to_string(),
                });
            };
            let used = parse_num(u, sat)?;
            let group = parse_num(g, sat + u.len() + 1)?;
            if used == 0 || group == 0 || used > group {
                return Err(CpuListError::BadStride {
                    at: sat,
                    used,
                    group,
                });
            }
            (used, group)
        }
    };
    let mut base = lo;
    while base <= hi {
        for c in base..base.saturating_add(used).min(hi + 1) {
            set.insert(c);
        }
        match base.checked_add(group) {
            Some(b) => base = b,
            None => break,
        }
    }
    Ok(())
}

impl FromStr for CpuSet {
    type Err = CpuListError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuSet::parse_list(s)
    }
}

impl fmt::Display for CpuSet {
    /// The kernel's canonical cpulist: ascending, consecutive CPUs merged into `a-b`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut it = self.iter().peekable();
        while let Some(lo) = it.next() {
            let mut hi = lo;
            while it.peek() == Some(&(hi + 1)) {
                hi += 1;
                it.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut s = CpuSet::new();
        for c in iter {
            s.insert(c);
        }
        s
    }
}

impl serde::Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_forms() {
        let s: CpuSet = "0-3,8,10-11\n".parse().unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(s.to_string(), "0-3,8,10-11");
        let s: CpuSet = "0-1023:2/256".parse().unwrap();
        assert_eq!(s.to_string(), "0-1,256-257,512-513,768-769");
        assert!(CpuSet::parse_list("").unwrap().is_empty());
        assert!(CpuSet::parse_list("\n").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_place() {
        assert_eq!(
            CpuSet::parse_list("0-3,x").unwrap_err(),
            CpuListError::ExpectedNumber {
                at: 4,
                found: "x".into()
            }
        );
        assert!(matches!(
            CpuSet::parse_list("5-2"),
            Err(CpuListError::Backwards {
                at: 0,
                lo: 5,
                hi: 2
            })
        ));
        assert!(matches!(
            CpuSet::parse_list("0-7:3/2"),
            Err(CpuListError::BadStride { .. })
        ));
        assert!(matches!(
            CpuSet::parse_list("0-99999"),
            Err(CpuListError::TooLarge { .. })
        ));
    }

    #[test]
    fn set_algebra_keeps_canonical_form() {
        let a: CpuSet = "0-70".parse().unwrap();
        let b: CpuSet = "64-127".parse().unwrap();
        assert_eq!(a.intersection(&b).to_string(), "64-70");
        assert_eq!(a.difference(&b).to_string(), "0-63");
        assert_eq!(b.difference(&"64-127".parse().unwrap()), CpuSet::new());
        assert_eq!(a.union(&b).to_string(), "0-127");
        assert_eq!(a.last(), Some(70));
        assert!(CpuSet::single(3).is_subset(&a));
    }

    proptest::proptest! {
        #[test]
        fn intersection_from_is_the_intersection_above_floor(
            a in proptest::collection::btree_set(0u32..600, 0..40),
            b in proptest::collection::btree_set(0u32..600, 0..300),
            floor in 0u32..700,
        ) {
            let (a, b): (CpuSet, CpuSet) = (a.into_iter().collect(), b.into_iter().collect());
            let want: CpuSet = a.intersection(&b).iter().filter(|&c| c >= floor).collect();
            let got = a.intersection_from(&b, floor);
            proptest::prop_assert_eq!(&got, &want);
            // Canonical (no trailing zero word), so equal sets compare equal.
            proptest::prop_assert_eq!(got.words.last().copied().unwrap_or(1) != 0, true);
            let low = a.first().unwrap_or(0);
            proptest::prop_assert_eq!(a.intersection_from(&b, low), a.intersection(&b));
        }
    }
}
