//! A fast hasher for the scheduler's maps keyed by engine-assigned integers (item, batch and
//! flush ids, CPU numbers).
//!
//! SipHash (std's default) was a third of the instructions of dispatching an item: every item
//! touches these maps about 16 times under the engine lock. The keys here are never chosen by
//! clients (ids are handed out in sequence; a client can only *look up* an id, which cannot
//! build collision chains), so HashDoS resistance buys nothing. Maps keyed by client text
//! (targets, keys, workqueue names) keep SipHash.
//!
//! The hash keeps **runs of 16 consecutive keys together**: their low four bits are the key's
//! own, and the rest of the key is multiplied by an odd constant (as rustc's FxHash does a
//! word), which spreads the runs over the table and mixes the top bits that hashbrown takes
//! its control byte from. Sequential ids, the common key, then fill a control group and a
//! few cache lines of buckets in turn, where a plain multiplication sent each id to a bucket
//! of its own, a cache miss per insert and per removal once the map outgrows the cache: the
//! result store's id map held up to `results_max` (2^20) entries, inserted in id order and
//! removed oldest first (it is now a paged index whose map is keyed by page number,
//! `sched/results.rs`'s `Index`, 32 times smaller). Measured (`wqd-bench --profile-engine 20000 batch=100 store=N`,
//! full results, old and new alternated twice): 2^20 stored results 1 338 / 1 249 → 1 009 /
//! 981 ns per item, 2^16 929 / 779 → 828 / 663, 2^10 unchanged. Keys in a power-of-two
//! stride above 16 share low bits either way (the multiplication alone kept them too).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// See the module docs. Only for integer keys.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

const K: u64 = 0xf135_7aea_2e62_a9c5;

/// Consecutive keys per run kept together: a hashbrown control group.
const BLOCK_BITS: u32 = 4;
const BLOCK_MASK: u64 = (1 << BLOCK_BITS) - 1;

impl Hasher for IdHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Not used by integer keys; correct for anything else, just not tuned.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        let x = self.0.rotate_left(5) ^ n;
        // Runs of 16 consecutive keys keep their order in the low bits (one control group of
        // the table, a few cache lines of buckets); the runs themselves are spread by the
        // multiplication, as are the top bits.
        self.0 = ((x >> BLOCK_BITS).wrapping_mul(K) << BLOCK_BITS) | (x & BLOCK_MASK);
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn hash(n: u64) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(n)
    }

    #[test]
    fn runs_of_sixteen_consecutive_ids_stay_together_and_runs_spread() {
        let base = 0x1234_5670u64;
        for run in 0..1024u64 {
            let first = hash(base + run * 16);
            for i in 0..16 {
                let h = hash(base + run * 16 + i);
                // The same run: the same bucket block, slots in id order.
                assert_eq!(h >> BLOCK_BITS, first >> BLOCK_BITS, "run {run}, id {i}");
                assert_eq!(h & BLOCK_MASK, (base + i) & BLOCK_MASK);
            }
        }
        // 1 024 consecutive runs land in 1 024 different blocks of a 2^14-bucket table (the
        // odd multiplier is a bijection on the low bits), and not in id order.
        let blocks: Vec<u64> = (0..1024u64)
            .map(|run| (hash(base + run * 16) >> BLOCK_BITS) & 1023)
            .collect();
        let distinct: std::collections::HashSet<_> = blocks.iter().collect();
        assert_eq!(distinct.len(), 1024);
        assert!(blocks.windows(2).filter(|w| w[1] == w[0] + 1).count() < 16);
        // hashbrown's control byte (the top 7 bits) takes most of its values.
        let tops: std::collections::HashSet<u64> =
            (0..4096u64).map(|n| hash(base + n) >> 57).collect();
        assert!(tops.len() > 100, "{} control bytes", tops.len());
    }
}
