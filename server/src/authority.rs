//! Rewriting the HTTP/2 `:authority` that stock gRPC clients send on a Unix socket into one
//! hyper's `h2` accepts, below hyper, in the client-to-server bytes of a connection.
//!
//! Why: grpcio 1.57 and later send the socket path as `:authority` (`tmp%2Fwqd.sock`), as do
//! grpc-java (`/run/wqd.sock`) and grpc-swift (`%2Frun%2Fwqd.sock`). `h2` parses the value with
//! `http::uri::Authority` and resets the stream with PROTOCOL_ERROR when that fails, so every
//! call of those clients fails with their default options (upstream h2 PR 487, open). Owns:
//! [`Rewriter`] (a sans-IO state machine over the client's bytes: the preface, then frames),
//! [`rewrite_block`] (one whole HPACK header block, in place) and the RFC 7541 Appendix B
//! Huffman code ([`huffman_encode`], [`huffman_decode`]). The read adapter that runs a
//! [`Rewriter`] on the Unix listener is `crate::conn::Rewrite`.
//!
//! Invariants:
//!
//! * Length-preserving: every frame comes out with its input length and header, every header
//!   block with its length, every string with its length prefix and its decoded length. The
//!   output is the input with some bytes of some `:authority` values changed, in the same
//!   order; only a header block (HEADERS and its CONTINUATIONs, at most [`MAX_BLOCK`]) is held
//!   back, until its END_HEADERS, which `h2` waits for anyway.
//! * HPACK state of both ends stays identical: a dynamic-table entry costs name length + value
//!   length + 32 (RFC 7541 §4.1), decoded lengths do not change, and every representation
//!   (indexed, literal with or without indexing, never indexed, table size update) is kept, so
//!   the client's encoder and the server's decoder add and evict the same entries at the same
//!   indexes. An entry added by a rewritten literal holds the rewritten value on the server, so
//!   the later indexed references of the client need no change.
//! * Valid authorities are untouched: a value is rewritten only when `http::uri::Authority`
//!   (the parser `h2` uses) refuses it, and only when the rewritten value is accepted. The
//!   rewrite maps every byte outside `[A-Za-z0-9.-]` to `-` (`tmp%2Fa.sock` → `tmp-2Fa.sock`);
//!   for a Huffman-coded value a mapped byte may become `x` or `X` instead, to keep the coded
//!   length in whole bytes (see `mend`).
//! * Anything unparseable passes through unchanged, from there on for the connection (bytes that
//!   are not an HTTP/2 client preface, a header block interleaved with other frames) or for
//!   the block (bad HPACK, a block over [`MAX_BLOCK`]): `h2` judges it and gives the precise
//!   error; the rewrite never makes a connection worse.
//!
//! What it does not cover: an `:authority` literal whose name is a dynamic-table index (no
//! client we know sends one; following it would mean keeping the table), PUSH_PROMISE (clients
//! do not send it). The server-to-client direction is never touched.

use std::ops::Range;

use smallvec::SmallVec;

/// The HTTP/2 client preface every connection opens with.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most bytes (frame headers included) of one header block held to rewrite it; a larger block
/// passes through unchanged. Clients send a few hundred bytes.
pub const MAX_BLOCK: usize = 64 * 1024;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a header block or Huffman string was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("HPACK integer too large")]
    Integer,
    #[error("bad Huffman code (EOS or padding)")]
    Huffman,
}

// ---------------------------------------------------------------------------------------------
// Huffman code (RFC 7541 Appendix B)

/// Code length in bits of each symbol, 0..=255 and EOS (256), from RFC 7541 Appendix B. The
/// code is canonical: codes are assigned in order of (length, symbol), so the lengths are the
/// whole table ([`CODES`] are derived from them and checked against the RFC's in the tests).
#[rustfmt::skip]
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10
     6, 10, 10, 12, 13,  6,  8, 11, 10, 10,  8, 11,  8,  6,  6,  6, // 0x20  !"#$%&'()*+,-./
     5,  5,  5,  6,  6,  6,  6,  6,  6,  6,  7,  8, 15,  6, 12, 10, // 0x30 0-9:;<=>?
    13,  6,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7, // 0x40 @A-O
     7,  7,  7,  7,  7,  7,  7,  7,  8,  7,  8, 13, 19, 13, 14,  6, // 0x50 P-Z[\]^_
    15,  5,  6,  5,  6,  5,  6,  6,  6,  5,  7,  7,  6,  6,  6,  5, // 0x60 `a-o
     6,  7,  6,  5,  5,  6,  7,  7,  7,  7,  7, 15, 11, 14, 13, 28, // 0x70 p-z{|}~DEL
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0
    30,                                                             // EOS
];

const MIN_LEN: usize = 5;
const MAX_LEN: usize = 30;
const EOS: u16 = 256;

/// The canonical code of every symbol, right-aligned in `LENGTHS[sym]` bits.
const CODES: [u32; 257] = {
    let mut codes = [0u32; 257];
    let mut code = 0u32;
    let mut len = MIN_LEN;
    while len <= MAX_LEN {
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                codes[sym] = code;
                code += 1;
            }
            sym += 1;
        }
        code <<= 1;
        len += 1;
    }
    codes
};

/// For canonical decoding: per length, the first code, how many codes, and where its symbols
/// start in [`SORTED`].
struct Canon {
    first: [u32; MAX_LEN + 1],
    count: [u32; MAX_LEN + 1],
    start: [u16; MAX_LEN + 1],
}

const CANON: Canon = {
    let mut c = Canon {
        first: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        start: [0; MAX_LEN + 1],
    };
    let mut at = 0u16;
    let mut len = MIN_LEN;
    while len <= MAX_LEN {
        c.start[len] = at;
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                if c.count[len] == 0 {
                    c.first[len] = CODES[sym];
                }
                c.count[len] += 1;
                at += 1;
            }
            sym += 1;
        }
        len += 1;
    }
    c
};

/// The symbols in code order.
const SORTED: [u16; 257] = {
    let mut s = [0u16; 257];
    let mut at = 0;
    let mut len = MIN_LEN;
    while len <= MAX_LEN {
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                s[at] = sym as u16;
                at += 1;
            }
            sym += 1;
        }
        len += 1;
    }
    s
};

/// Bits the Huffman code of `src` takes (before padding).
pub fn huffman_bits(src: &[u8]) -> usize {
    src.iter()
        .map(|&b| usize::from(LENGTHS[usize::from(b)]))
        .sum()
}

/// Appends the Huffman code of `src` to `dst`, padded with the most significant bits of EOS
/// (ones) to a whole byte.
pub fn huffman_encode(src: &[u8], dst: &mut Vec<u8>) {
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &b in src {
        let len = u32::from(LENGTHS[usize::from(b)]);
        acc = (acc << len) | u64::from(CODES[usize::from(b)]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            dst.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        let pad = 8 - bits;
        dst.push(((acc << pad) | ((1 << pad) - 1)) as u8);
    }
}

/// Appends the decoding of the Huffman string `src` to `dst`.
///
/// # Errors
/// [`BlockError::Huffman`]: the EOS symbol inside, padding of 8 bits or more, or padding that
/// is not a prefix of EOS (RFC 7541 §5.2).
pub fn huffman_decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), BlockError> {
    let mut code = 0u32;
    let mut len = 0usize;
    for &byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            if len < MIN_LEN {
                continue;
            }
            if len > MAX_LEN {
                return Err(BlockError::Huffman);
            }
            let off = code.wrapping_sub(CANON.first[len]);
            if code >= CANON.first[len] && off < CANON.count[len] {
                let sym = SORTED[usize::from(CANON.start[len]) + off as usize];
                if sym == EOS {
                    return Err(BlockError::Huffman);
                }
                dst.push(sym as u8);
                code = 0;
                len = 0;
            }
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones.
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(BlockError::Huffman);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One header block

/// Whether `b` may stay in a rewritten authority.
fn keep(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

/// Whether `h2` accepts `v` as `:authority` (it parses with the same crate and version).
fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// An HPACK integer with an `n`-bit prefix at `b[i]` (RFC 7541 §5.1): its value and the index
/// after it.
fn integer(b: &[u8], i: usize, n: u32) -> Result<(usize, usize), BlockError> {
    let mask = (1usize << n) - 1;
    let first = *b.get(i).ok_or(BlockError::Truncated)?;
    let mut v = usize::from(first) & mask;
    let mut i = i + 1;
    if v < mask {
        return Ok((v, i));
    }
    let mut shift = 0u32;
    loop {
        let byte = *b.get(i).ok_or(BlockError::Truncated)?;
        i += 1;
        // 4 continuation bytes give 28 bits: more than any length in a 64 KiB block.
        if shift > 21 {
            return Err(BlockError::Integer);
        }
        v += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok((v, i));
        }
    }
}

/// A string literal's bytes in the block and whether they are Huffman-coded.
struct Str {
    bytes: Range<usize>,
    huffman: bool,
}

fn string(b: &[u8], i: usize) -> Result<(Str, usize), BlockError> {
    let huffman = b.get(i).ok_or(BlockError::Truncated)? & 0x80 != 0;
    let (len, start) = integer(b, i, 7)?;
    let end = start.checked_add(len).ok_or(BlockError::Truncated)?;
    if end > b.len() {
        return Err(BlockError::Truncated);
    }
    Ok((
        Str {
            bytes: start..end,
            huffman,
        },
        end,
    ))
}

fn decoded(b: &[u8], s: &Str) -> Result<SmallVec<[u8; 64]>, BlockError> {
    let raw = &b[s.bytes.clone()];
    if !s.huffman {
        return Ok(SmallVec::from_slice(raw));
    }
    let mut v = Vec::with_capacity(raw.len() * 8 / 5);
    huffman_decode(raw, &mut v)?;
    Ok(SmallVec::from_vec(v))
}

/// The replacement bytes (same length as the coded string) of the `:authority` string `s`, or
/// `None` when it is valid already or cannot be mended at the same length.
fn mend(b: &[u8], s: &Str) -> Result<Option<Vec<u8>>, BlockError> {
    let value = decoded(b, s)?;
    if valid_authority(&value) {
        return Ok(None);
    }
    let mut mapped: Vec<u8> = value
        .iter()
        .map(|&c| if keep(c) { c } else { b'-' })
        .collect();
    if !s.huffman {
        return Ok(valid_authority(&mapped).then_some(mapped));
    }
    // The coded string must fill the same whole bytes: more than 8 (n - 1) bits. `-` takes 6
    // bits, no more than any byte it replaces (every 5-bit symbol is kept), so the mapped code
    // is never longer; when it is shorter by a byte or more, replaced bytes whose own code was
    // longer take `x` (7 bits) or `X` (8 bits) instead, never more bits than they had.
    let n = s.bytes.len();
    let need = (8 * n).saturating_sub(7);
    let mut bits = huffman_bits(&mapped);
    for (m, &orig) in mapped.iter_mut().zip(value.iter()) {
        if bits >= need {
            break;
        }
        if keep(orig) {
            continue;
        }
        let room = usize::from(LENGTHS[usize::from(orig)])
            .min(8)
            .saturating_sub(6);
        let add = room.min(need - bits);
        *m = match add {
            0 => b'-',
            1 => b'x',
            _ => b'X',
        };
        bits += add;
    }
    if !valid_authority(&mapped) {
        return Ok(None);
    }
    let mut coded = Vec::with_capacity(n);
    huffman_encode(&mapped, &mut coded);
    Ok((coded.len() == n).then_some(coded))
}

/// Whether the literal name `s` is `:authority`.
fn is_authority(b: &[u8], s: &Str) -> Result<bool, BlockError> {
    const NAME: &[u8] = b":authority";
    if !s.huffman {
        return Ok(&b[s.bytes.clone()] == NAME);
    }
    // `:authority` codes to 8 bytes; anything longer or shorter is another name.
    if s.bytes.len() != 8 {
        return Ok(false);
    }
    Ok(decoded(b, s)?.as_slice() == NAME)
}

/// Rewrites, in place, every `:authority` value of one whole header block that `h2` would
/// refuse (see the module docs). Returns how many values it rewrote; on an error nothing was
/// changed.
///
/// The `:authority` fields it sees: literals (with incremental indexing, without indexing,
/// never indexed) whose name is static index 1 or the literal name `:authority`.
///
/// # Errors
/// A block that does not parse as HPACK ([`BlockError`]); `h2` will refuse it with its own
/// error.
pub fn rewrite_block(block: &mut [u8]) -> Result<usize, BlockError> {
    let mut edits: SmallVec<[(usize, Vec<u8>); 2]> = SmallVec::new();
    let b: &[u8] = block;
    let mut i = 0;
    while i < b.len() {
        let first = b[i];
        if first & 0x80 != 0 {
            // Indexed field (§6.1).
            i = integer(b, i, 7)?.1;
            continue;
        }
        if first & 0xe0 == 0x20 {
            // Dynamic table size update (§6.3).
            i = integer(b, i, 5)?.1;
            continue;
        }
        // Literal with incremental indexing (01), without indexing (0000), never indexed (0001).
        let prefix = if first & 0x40 != 0 { 6 } else { 4 };
        let (index, next) = integer(b, i, prefix)?;
        i = next;
        let authority = if index == 0 {
            let (name, next) = string(b, i)?;
            i = next;
            is_authority(b, &name)?
        } else {
            index == 1
        };
        let (value, next) = string(b, i)?;
        if authority {
            if let Some(new) = mend(b, &value)? {
                edits.push((value.bytes.start, new));
            }
        }
        i = next;
    }
    for (at, new) in &edits {
        block[*at..*at + new.len()].copy_from_slice(new);
    }
    Ok(edits.len())
}

// ---------------------------------------------------------------------------------------------
// The stream of frames

/// Where the rewriter is in the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes of the preface matched.
    Preface(usize),
    /// Collecting a frame header into `head`.
    Head,
    /// Forwarding this many more payload bytes as they come.
    Pass(usize),
    /// Holding this many more payload bytes of a header-block frame.
    Hold(usize),
    /// Forwarding everything unchanged (not HTTP/2 as expected, or end of input).
    Dead,
}

/// The header block being received: the stream it belongs to, and whether it is held to be
/// rewritten (false: too large, or a HEADERS frame whose padding does not fit).
#[derive(Debug, Clone, Copy)]
struct Block {
    stream: u32,
    holding: bool,
}

/// The client-to-server byte stream of one connection, rewritten as it passes (see the module
/// docs). Feed it the bytes read, in order; forward what it appends to `out`.
#[derive(Debug)]
pub struct Rewriter {
    state: State,
    /// The frame header being collected, then the current frame's.
    head: [u8; 9],
    head_got: usize,
    /// The open header block, if any.
    block: Option<Block>,
    /// The frames (headers included) of the held block, not yet forwarded.
    held: Vec<u8>,
    /// The header block fragment of each held frame, in `held`.
    frags: SmallVec<[Range<usize>; 2]>,
    /// Where the current held frame starts in `held`.
    frame_at: usize,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Self {
            state: State::Preface(0),
            head: [0; 9],
            head_got: 0,
            block: None,
            held: Vec::new(),
            frags: SmallVec::new(),
            frame_at: 0,
        }
    }

    /// Whether it forwards everything unchanged from now on.
    pub fn is_dead(&self) -> bool {
        self.state == State::Dead
    }

    /// Bytes held back now (a header block waiting for its end).
    pub fn held(&self) -> usize {
        self.held.len()
            + if self.state == State::Head {
                self.head_got
            } else {
                0
            }
    }

    /// How many of the next `n` input bytes it forwards unchanged without looking at them (the
    /// payload of a frame it passes, or everything once dead), consumed now: the caller
    /// forwards them itself. Only while nothing is held.
    pub fn skip(&mut self, n: usize) -> usize {
        match self.state {
            State::Dead => n,
            State::Pass(left) if self.held.is_empty() && left > n => {
                self.state = State::Pass(left - n);
                n
            }
            // The frame's end needs `frame_done`: left to `feed`.
            State::Pass(left) if self.held.is_empty() && left > 0 => {
                self.state = State::Pass(1);
                left - 1
            }
            _ => 0,
        }
    }

    /// Feeds the next bytes from the client; appends to `out` what may be forwarded now.
    /// Returns how many `:authority` values it rewrote.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut rewritten = 0;
        while !input.is_empty() {
            match self.state {
                State::Dead => {
                    out.extend_from_slice(input);
                    return rewritten;
                }
                State::Preface(got) => {
                    let n = (PREFACE.len() - got).min(input.len());
                    if input[..n] != PREFACE[got..got + n] {
                        self.die(out);
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if got + n == PREFACE.len() {
                        State::Head
                    } else {
                        State::Preface(got + n)
                    };
                }
                State::Head => {
                    let n = (9 - self.head_got).min(input.len());
                    self.head[self.head_got..self.head_got + n].copy_from_slice(&input[..n]);
                    self.head_got += n;
                    input = &input[n..];
                    if self.head_got == 9 {
                        self.head_got = 0;
                        rewritten += self.on_head(out);
                    }
                }
                State::Pass(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = State::Pass(left - n);
                    if left == n {
                        rewritten += self.frame_done(out);
                    }
                }
                State::Hold(left) => {
                    let n = left.min(input.len());
                    self.held.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = State::Hold(left - n);
                    if left == n {
                        rewritten += self.frame_done(out);
                    }
                }
            }
        }
        rewritten
    }

    /// The input ended: forwards whatever is held, unchanged.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.die(out);
    }

    /// Forwards what is held unchanged and passes everything from now on.
    fn die(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.held.clear();
        self.frags.clear();
        if self.state == State::Head {
            out.extend_from_slice(&self.head[..self.head_got]);
        }
        self.head_got = 0;
        self.state = State::Dead;
    }

    /// Gives up rewriting the open block: forwards what is held of it unchanged.
    fn release(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.held.clear();
        self.frags.clear();
        if let Some(b) = self.block.as_mut() {
            b.holding = false;
        }
    }

    fn len(&self) -> usize {
        (usize::from(self.head[0]) << 16)
            | (usize::from(self.head[1]) << 8)
            | usize::from(self.head[2])
    }

    fn stream(&self) -> u32 {
        u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) & 0x7fff_ffff
    }

    /// A whole frame header arrived in `head`.
    fn on_head(&mut self, out: &mut Vec<u8>) -> usize {
        let (len, kind, stream) = (self.len(), self.head[3], self.stream());
        let fits = |held: usize| held + 9 + len <= MAX_BLOCK;
        match (self.block, kind) {
            (None, HEADERS) => {
                let holding = fits(0);
                self.block = Some(Block { stream, holding });
            }
            (Some(b), CONTINUATION) if b.stream == stream => {
                if b.holding && !fits(self.held.len()) {
                    self.release(out);
                }
            }
            // A header block must be contiguous, and CONTINUATION only follows one: h2 fails
            // the connection; nothing to rewrite.
            (Some(_), _) | (None, CONTINUATION) => {
                self.state = State::Head;
                self.head_got = 9;
                self.die(out);
                return 0;
            }
            (None, _) => {}
        }
        if self.block.is_some_and(|b| b.holding) {
            self.frame_at = self.held.len();
            self.held.extend_from_slice(&self.head);
            self.state = State::Hold(len);
        } else {
            out.extend_from_slice(&self.head);
            self.state = State::Pass(len);
        }
        if len == 0 {
            return self.frame_done(out);
        }
        0
    }

    /// The current frame's payload is complete.
    fn frame_done(&mut self, out: &mut Vec<u8>) -> usize {
        let (kind, flags, len) = (self.head[3], self.head[4], self.len());
        let held = self.state == State::Hold(0);
        self.state = State::Head;
        if kind != HEADERS && kind != CONTINUATION {
            return 0;
        }
        if held {
            let start = self.frame_at + 9;
            let payload = &self.held[start..start + len];
            let mut from = 0;
            let mut pad = 0;
            if kind == HEADERS && flags & PADDED != 0 {
                pad = payload.first().map_or(len + 1, |&p| usize::from(p));
                from = 1;
            }
            if kind == HEADERS && flags & PRIORITY != 0 {
                from += 5;
            }
            if from + pad > len {
                // h2 refuses the frame; forward it as is.
                self.release(out);
            } else {
                self.frags.push(start + from..start + len - pad);
            }
        }
        if flags & END_HEADERS == 0 {
            return 0;
        }
        self.block = None;
        if self.held.is_empty() {
            return 0;
        }
        let n = self.rewrite_held();
        out.extend_from_slice(&self.held);
        self.held.clear();
        self.frags.clear();
        n
    }

    /// Rewrites the held block's fragments as one header block.
    fn rewrite_held(&mut self) -> usize {
        if let [one] = self.frags.as_slice() {
            return rewrite_block(&mut self.held[one.clone()]).unwrap_or(0);
        }
        let mut block: Vec<u8> = Vec::new();
        for r in &self.frags {
            block.extend_from_slice(&self.held[r.clone()]);
        }
        let n = rewrite_block(&mut block).unwrap_or(0);
        if n > 0 {
            let mut at = 0;
            for r in &self.frags {
                let k = r.len();
                self.held[r.clone()].copy_from_slice(&block[at..at + k]);
                at += k;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    //! Checked against independent coders: `httlib-hpack`/`httlib-huffman` encode, `loona-hpack`
    //! decodes; neither shares code with this module or with each other.

    use super::*;
    use proptest::prelude::*;

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;
    /// A header field and the oracle's encoding flags.
    type Field = (Vec<u8>, Vec<u8>, u8);

    fn huff(src: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        huffman_encode(src, &mut v);
        v
    }

    fn oracle_huff(src: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        httlib_huffman::encode(src, &mut v).expect("oracle encodes");
        v
    }

    #[test]
    fn codes_are_the_rfc_table() {
        // Rows of RFC 7541 Appendix B: (symbol, code as hex, length).
        for (sym, code, len) in [
            (0usize, 0x1ff8u32, 13u8),
            (1, 0x7fffd8, 23),
            (10, 0x3ffffffc, 30),
            (b' ' as usize, 0x14, 6),
            (b'%' as usize, 0x15, 6),
            (b'-' as usize, 0x16, 6),
            (b'/' as usize, 0x18, 6),
            (b'0' as usize, 0x0, 5),
            (b':' as usize, 0x5c, 7),
            (b'X' as usize, 0xfc, 8),
            (b'x' as usize, 0x79, 7),
            (b'~' as usize, 0x1ffd, 13),
            (128, 0xfffe6, 20),
            (203, 0x7ffffde, 27),
            (255, 0x3ffffee, 26),
            (256, 0x3fffffff, 30),
        ] {
            assert_eq!((CODES[sym], LENGTHS[sym]), (code, len), "symbol {sym}");
        }
        // The rule `mend` relies on: every byte it replaces codes to 6 bits or more.
        for b in 0..=255u8 {
            assert!(keep(b) || LENGTHS[usize::from(b)] >= 6, "{b}");
        }
    }

    #[test]
    fn every_symbol_codes_as_the_oracle() {
        for b in 0..=255u8 {
            assert_eq!(huff(&[b]), oracle_huff(&[b]), "symbol {b}");
            let mut d = Vec::new();
            huffman_decode(&huff(&[b]), &mut d).unwrap();
            assert_eq!(d, [b]);
        }
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        let mut d = Vec::new();
        // A whole byte of padding.
        assert_eq!(huffman_decode(&[0xff], &mut d), Err(BlockError::Huffman));
        // '0' (00000) then padding 000: not ones.
        assert_eq!(huffman_decode(&[0x00], &mut d), Err(BlockError::Huffman));
        // EOS (30 ones) then padding.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut d),
            Err(BlockError::Huffman)
        );
    }

    proptest! {
        #[test]
        fn huffman_round_trips_against_the_oracles(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            let coded = huff(&v);
            prop_assert_eq!(&coded, &oracle_huff(&v));
            prop_assert_eq!(coded.len(), huffman_bits(&v).div_ceil(8));
            let mut d = Vec::new();
            huffman_decode(&coded, &mut d).unwrap();
            prop_assert_eq!(&d, &v);
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&coded).unwrap();
            prop_assert_eq!(&theirs, &v);
        }

        #[test]
        fn huffman_decode_agrees_with_the_oracle(v in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut d = Vec::new();
            let ours = huffman_decode(&v, &mut d).ok().map(|()| d);
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&v).ok();
            prop_assert_eq!(ours, theirs);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Header blocks

    /// Authorities clients send: valid ones, the socket-path forms, and anything.
    fn authority() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"localhost".to_vec()),
            Just(b"127.0.0.1:7070".to_vec()),
            "[a-z0-9/._]{1,40}".prop_map(|p| format!("/{p}.sock").into_bytes()),
            "[a-z0-9/._]{1,40}".prop_map(|p| format!("{p}.sock").replace('/', "%2F").into_bytes()),
            "[ -~]{0,40}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    /// One header field with how the oracle encodes it (httlib-hpack flags).
    fn field() -> impl Strategy<Value = Field> {
        let name = prop_oneof![
            Just(b":authority".to_vec()),
            Just(b":path".to_vec()),
            Just(b"te".to_vec()),
            Just(b"grpc-timeout".to_vec()),
            "[a-z-]{1,12}".prop_map(String::into_bytes),
        ];
        let value = prop_oneof![authority(), "[ -~]{0,30}".prop_map(String::into_bytes)];
        // HUFFMAN_NAME 1, HUFFMAN_VALUE 2, WITH_INDEXING 4, NEVER_INDEXED 8, BEST_FORMAT 16.
        let flags = (
            0u8..4,
            prop_oneof![Just(0u8), Just(4), Just(8)],
            any::<bool>(),
        )
            .prop_map(|(h, ix, best)| h | ix | if best { 16 } else { 0 });
        (name, value, flags)
    }

    /// Requests of one connection: each has `:authority` (from a small set, so later requests
    /// hit the dynamic table) and some other fields.
    fn connection() -> impl Strategy<Value = Vec<Vec<Field>>> {
        (
            proptest::collection::vec(authority(), 1..3),
            proptest::collection::vec(
                (
                    any::<prop::sample::Index>(),
                    0u8..32,
                    proptest::collection::vec(field(), 0..5),
                ),
                1..8,
            ),
        )
            .prop_map(|(auths, reqs)| {
                reqs.into_iter()
                    .map(|(pick, flags, mut rest)| {
                        let a = auths[pick.index(auths.len())].clone();
                        rest.insert(0, (b":authority".to_vec(), a, flags));
                        rest.insert(0, (b":method".to_vec(), b"POST".to_vec(), 16));
                        rest
                    })
                    .collect()
            })
    }

    fn encode(enc: &mut httlib_hpack::Encoder<'_>, fields: &[Field]) -> Vec<u8> {
        let mut dst = Vec::new();
        for (n, v, f) in fields {
            enc.encode((n.clone(), v.clone(), *f), &mut dst)
                .expect("oracle encodes");
        }
        dst
    }

    /// What a rewritten value must be: the same when valid; otherwise (when mended) of the same
    /// length, valid, with the kept bytes in place and every other byte `-`, `x` or `X`.
    fn check_value(orig: &[u8], new: &[u8]) -> Result<bool, TestCaseError> {
        if valid_authority(orig) || orig == new {
            prop_assert_eq!(orig, new);
            return Ok(false);
        }
        prop_assert_eq!(orig.len(), new.len());
        prop_assert!(
            http::uri::Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(new)).is_ok(),
            "{:?}",
            String::from_utf8_lossy(new)
        );
        for (&o, &n) in orig.iter().zip(new) {
            let ok = if keep(o) {
                n == o
            } else {
                matches!(n, b'-' | b'x' | b'X')
            };
            prop_assert!(ok, "{} became {}", o, n);
        }
        Ok(true)
    }

    /// Whether a raw literal with this value must be mended (a Huffman one may not fit).
    fn mendable_raw(v: &[u8]) -> bool {
        !valid_authority(v) && !v.is_empty()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn rewritten_blocks_decode_to_the_same_headers(conn in connection()) {
            let mut enc = httlib_hpack::Encoder::default();
            let mut before = loona_hpack::Decoder::new();
            let mut after = loona_hpack::Decoder::new();
            for req in &conn {
                let block = encode(&mut enc, req);
                let mut new = block.clone();
                let n = rewrite_block(&mut new).expect("the oracle's block parses");
                prop_assert_eq!(new.len(), block.len());
                let a = before.decode(&block).expect("oracle decodes the original");
                let b: Headers = after.decode(&new).expect("oracle decodes the rewrite");
                prop_assert_eq!(a.len(), b.len());
                let mut changed = 0;
                for ((an, av), (bn, bv)) in a.iter().zip(&b) {
                    prop_assert_eq!(an, bn);
                    if an == b":authority" {
                        changed += usize::from(check_value(av, bv)?);
                    } else {
                        prop_assert_eq!(av, bv);
                    }
                }
                // Indexed references repeat an already rewritten value: not counted.
                prop_assert!(n <= changed, "{} rewritten, {} changed", n, changed);
                if n == 0 {
                    prop_assert_eq!(&new, &block);
                }
            }
        }

        #[test]
        fn raw_and_huffman_literals_are_mended(
            value in authority(),
            huffman in any::<bool>(),
            indexing in prop_oneof![Just(0x40u8), Just(0x00), Just(0x10)],
            literal_name in any::<bool>(),
        ) {
            // One literal `:authority`, by static index 1 or by literal name.
            let mut block = Vec::new();
            if literal_name {
                block.push(indexing);
                if huffman {
                    let name = huff(b":authority");
                    block.push(0x80 | name.len() as u8);
                    block.extend_from_slice(&name);
                } else {
                    block.push(10);
                    block.extend_from_slice(b":authority");
                }
            } else {
                block.push(indexing | 1);
            }
            let coded = if huffman { huff(&value) } else { value.clone() };
            prop_assume!(coded.len() < 127);
            block.push(if huffman { 0x80 } else { 0 } | coded.len() as u8);
            block.extend_from_slice(&coded);
            let mut new = block.clone();
            let n = rewrite_block(&mut new).unwrap();
            let decoded = loona_hpack::Decoder::new().decode(&new).unwrap();
            prop_assert_eq!(&decoded[0].0, b":authority");
            let mended = check_value(&value, &decoded[0].1)?;
            prop_assert_eq!(n, usize::from(mended));
            let fits = value.iter().all(|&b| keep(b) || LENGTHS[usize::from(b)] <= 8);
            if mendable_raw(&value) && (!huffman || fits) {
                prop_assert!(mended, "{:?} not mended", String::from_utf8_lossy(&value));
            }
        }

        #[test]
        fn random_blocks_never_panic(mut b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let orig = b.clone();
            match rewrite_block(&mut b) {
                Ok(0) | Err(_) => prop_assert_eq!(b, orig),
                Ok(_) => prop_assert_eq!(b.len(), orig.len()),
            }
        }
    }

    #[test]
    fn the_clients_forms() {
        // grpcio 1.85 (`%2F`, Huffman and raw), grpc-java (raw path), grpc-swift (`%2F`).
        for (value, want) in [
            (&b"tmp%2Fa%2Fs.sock"[..], &b"tmp-2Fa-2Fs.sock"[..]),
            (b"/tmp/a/s.sock", b"-tmp-a-s.sock"),
            (b"%2Frun%2Fwqd.sock", b"-2Frun-2Fwqd.sock"),
            (b"localhost", b"localhost"),
        ] {
            for huffman in [false, true] {
                let coded = if huffman { huff(value) } else { value.to_vec() };
                let mut block = vec![0x41, if huffman { 0x80 } else { 0 } | coded.len() as u8];
                block.extend_from_slice(&coded);
                // The next request refers to the entry: index 62.
                block.push(0x80 | 62);
                let mut new = block.clone();
                let n = rewrite_block(&mut new).unwrap();
                assert_eq!(n, usize::from(value != want));
                let h = loona_hpack::Decoder::new().decode(&new).unwrap();
                assert_eq!(h[0].1, want);
                assert_eq!(h[1].1, want);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Streams of frames

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// How a block goes on the wire: split points (HEADERS + CONTINUATIONs), padding,
    /// priority, and a DATA frame after it.
    #[derive(Debug, Clone)]
    struct Shape {
        splits: Vec<prop::sample::Index>,
        pad: Option<u8>,
        priority: bool,
        data: usize,
    }

    fn shape() -> impl Strategy<Value = Shape> {
        (
            proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
            proptest::option::of(0u8..20),
            any::<bool>(),
            0usize..40,
        )
            .prop_map(|(splits, pad, priority, data)| Shape {
                splits,
                pad,
                priority,
                data,
            })
    }

    /// Frames for `block` on `stream`.
    fn frames(block: &[u8], stream: u32, s: &Shape) -> Vec<u8> {
        let mut cuts: Vec<usize> = s.splits.iter().map(|i| i.index(block.len() + 1)).collect();
        cuts.push(0);
        cuts.push(block.len());
        cuts.sort_unstable();
        cuts.dedup();
        let parts: Vec<&[u8]> = if cuts.len() < 2 {
            vec![block]
        } else {
            cuts.windows(2).map(|w| &block[w[0]..w[1]]).collect()
        };
        let mut out = Vec::new();
        for (k, part) in parts.iter().enumerate() {
            let end = if k + 1 == parts.len() { END_HEADERS } else { 0 };
            if k == 0 {
                let mut p = Vec::new();
                let mut flags = end;
                if let Some(pad) = s.pad {
                    flags |= PADDED;
                    p.push(pad);
                }
                if s.priority {
                    flags |= PRIORITY;
                    p.extend_from_slice(&[0, 0, 0, 0, 16]);
                }
                p.extend_from_slice(part);
                p.extend(std::iter::repeat_n(0, usize::from(s.pad.unwrap_or(0))));
                out.extend(frame(HEADERS, flags, stream, &p));
            } else {
                out.extend(frame(CONTINUATION, end, stream, part));
            }
        }
        out.extend(frame(0x0, 0x1, stream, &vec![0x5a; s.data]));
        out
    }

    /// Runs `input` through a rewriter in `chunks`-sized reads the way `conn::Rewrite` does
    /// (skip first, then feed), then ends it.
    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, usize) {
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        let mut n = 0;
        for c in input.chunks(chunk.max(1)) {
            let k = rw.skip(c.len());
            out.extend_from_slice(&c[..k]);
            n += rw.feed(&c[k..], &mut out);
        }
        rw.finish(&mut out);
        (out, n)
    }

    /// The client's stream: preface, SETTINGS, then each request's frames.
    fn client_stream(conn: &[Vec<Field>], shapes: &[Shape]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut enc = httlib_hpack::Encoder::default();
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        let mut blocks = Vec::new();
        for (k, req) in conn.iter().enumerate() {
            let block = encode(&mut enc, req);
            let s = &shapes[k % shapes.len()];
            out.extend(frames(&block, 1 + 2 * k as u32, s));
            blocks.push(block);
        }
        (out, blocks)
    }

    /// The header blocks in a client stream (each frame's fragment joined until END_HEADERS).
    fn blocks_of(stream: &[u8]) -> Vec<Vec<u8>> {
        let mut i = PREFACE.len();
        let mut blocks = Vec::new();
        let mut cur = Vec::new();
        while i + 9 <= stream.len() {
            let len = (usize::from(stream[i]) << 16)
                | (usize::from(stream[i + 1]) << 8)
                | usize::from(stream[i + 2]);
            let (kind, flags) = (stream[i + 3], stream[i + 4]);
            let p = &stream[i + 9..i + 9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                let mut from = 0;
                let mut pad = 0;
                if kind == HEADERS && flags & PADDED != 0 {
                    pad = usize::from(p[0]);
                    from = 1;
                }
                if kind == HEADERS && flags & PRIORITY != 0 {
                    from += 5;
                }
                cur.extend_from_slice(&p[from..len - pad]);
                if flags & END_HEADERS != 0 {
                    blocks.push(std::mem::take(&mut cur));
                }
            }
            i += 9 + len;
        }
        blocks
    }

    proptest! {
        #[test]
        fn streams_are_rewritten_block_by_block_whatever_the_reads(
            conn in connection(),
            shapes in proptest::collection::vec(shape(), 1..4),
            chunk in 1usize..64,
        ) {
            let (input, blocks) = client_stream(&conn, &shapes);
            let (whole, n_whole) = run(&input, input.len());
            let (bytes, n_bytes) = run(&input, 1);
            let (chunks, n_chunks) = run(&input, chunk);
            prop_assert_eq!(whole.len(), input.len());
            prop_assert_eq!(&whole, &bytes);
            prop_assert_eq!(&whole, &chunks);
            prop_assert_eq!((n_whole, n_bytes), (n_chunks, n_chunks));
            // Each block came out as `rewrite_block` makes it, frames and padding untouched.
            let mut want = Vec::new();
            let mut n = 0;
            for b in &blocks {
                let mut b = b.clone();
                n += rewrite_block(&mut b).unwrap();
                want.push(b);
            }
            prop_assert_eq!(n, n_whole);
            prop_assert_eq!(blocks_of(&whole), want);
            prop_assert_eq!(blocks_of(&input), blocks);
            let (mut rebuilt, _) = client_stream(&conn, &shapes);
            // Outside the fragments nothing changed: equal once the fragments are swapped back.
            let frag_positions = fragment_positions(&input);
            for i in frag_positions {
                rebuilt[i] = whole[i];
            }
            prop_assert_eq!(rebuilt, whole);
        }

        #[test]
        fn garbage_passes_unchanged_in_length(
            mut input in proptest::collection::vec(any::<u8>(), 0..600),
            preface in any::<bool>(),
            chunk in 1usize..50,
        ) {
            if preface {
                input.splice(0..0, PREFACE.iter().copied());
            }
            let (whole, _) = run(&input, input.len());
            let (chunks, _) = run(&input, chunk);
            prop_assert_eq!(whole.len(), input.len());
            prop_assert_eq!(&whole, &chunks);
            for i in differing(&input, &whole) {
                prop_assert!(fragment_positions(&input).contains(&i));
            }
        }

        #[test]
        fn mutated_client_streams_keep_their_frames(
            conn in connection(),
            shapes in proptest::collection::vec(shape(), 1..3),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            chunk in 1usize..64,
        ) {
            let (mut input, _) = client_stream(&conn, &shapes);
            for (at, byte) in flips {
                let i = at.index(input.len());
                input[i] = byte;
            }
            let (whole, _) = run(&input, input.len());
            let (chunks, _) = run(&input, chunk);
            prop_assert_eq!(whole.len(), input.len());
            prop_assert_eq!(&whole, &chunks);
            let frags = fragment_positions(&input);
            for i in differing(&input, &whole) {
                prop_assert!(frags.contains(&i), "byte {} changed outside a header block", i);
            }
        }
    }

    fn differing(a: &[u8], b: &[u8]) -> Vec<usize> {
        a.iter()
            .zip(b)
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i)
            .collect()
    }

    /// Positions of header block fragment bytes in a well-framed prefix of `stream` (padding
    /// and priority excluded), as an independent walker sees them.
    fn fragment_positions(stream: &[u8]) -> std::collections::BTreeSet<usize> {
        let mut set = std::collections::BTreeSet::new();
        if !stream.starts_with(PREFACE) {
            return set;
        }
        let mut i = PREFACE.len();
        while i + 9 <= stream.len() {
            let len = (usize::from(stream[i]) << 16)
                | (usize::from(stream[i + 1]) << 8)
                | usize::from(stream[i + 2]);
            let (kind, flags) = (stream[i + 3], stream[i + 4]);
            let end = (i + 9 + len).min(stream.len());
            if kind == HEADERS || kind == CONTINUATION {
                let mut from = i + 9;
                let mut to = end;
                if kind == HEADERS && flags & PADDED != 0 && from < end {
                    to = to.saturating_sub(usize::from(stream[from]));
                    from += 1;
                }
                if kind == HEADERS && flags & PRIORITY != 0 {
                    from += 5;
                }
                set.extend(from..to);
            }
            i += 9 + len;
        }
        set
    }
}
