//! A fast hasher for the scheduler's maps keyed by engine-assigned integers (item, batch and
//! flush ids, CPU numbers).
//!
//! SipHash (std's default) was a third of the instructions of dispatching an item: every item
//! touches these maps about 16 times under the engine lock. The keys here are never chosen by
//! clients (ids are handed out in sequence; a client can only *look up* an id, which cannot
//! build collision chains), so HashDoS resistance buys nothing. Maps keyed by client text
//! (targets, keys, workqueue names) keep SipHash.
//!
//! The hash is one multiplication by an odd constant (as rustc's FxHash for a single word):
//! hashbrown takes the bucket from the low bits, which for sequential ids stay distinct, and
//! its control byte from the top bits, which the multiplication mixes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// See the module docs. Only for integer keys.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

const K: u64 = 0xf135_7aea_2e62_a9c5;

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
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
